//! One request/response exchange over one QUIC bidirectional stream.
//!
//! The requester opens a stream, writes one frame and finishes its half; the responder
//! reads one frame, writes one frame and finishes. A frame that is too large or
//! malformed makes the reader reset that stream with a code from [`codes`]: the
//! connection and every other stream carry on.

use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream, TransportConfig, VarInt};

use crate::codec::{self, FrameError, HEADER_LEN};
use crate::messages::{Envelope, Message};

/// Application error codes: stream resets and connection closes.
pub mod codes {
    use quinn::VarInt;

    /// Stream reset: the frame exceeded the reader's limit.
    pub const STREAM_FRAME_TOO_LARGE: VarInt = VarInt::from_u32(0x10);
    /// Stream reset: the frame did not decode.
    pub const STREAM_MALFORMED: VarInt = VarInt::from_u32(0x11);
    /// Stream reset: the frame is from another protocol version.
    pub const STREAM_VERSION_MISMATCH: VarInt = VarInt::from_u32(0x12);
    /// Stream reset: the reader gave up waiting for the frame.
    pub const STREAM_TIMEOUT: VarInt = VarInt::from_u32(0x13);

    /// Connection close: orderly shutdown.
    pub const CLOSE_NORMAL: VarInt = VarInt::from_u32(0);
    /// Connection close: the agent was revoked.
    pub const CLOSE_REVOKED: VarInt = VarInt::from_u32(1);
    /// Connection close: the hello named another protocol version.
    pub const CLOSE_VERSION_MISMATCH: VarInt = VarInt::from_u32(2);
    /// Connection close: a newer session of the same agent replaced this one.
    pub const CLOSE_REPLACED: VarInt = VarInt::from_u32(3);
    /// Connection close: the peer broke the session protocol (no hello, wrong first message).
    pub const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(4);
    /// Connection close: the controller is shutting down.
    pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(5);

    /// TLS alert `certificate_revoked` (44) as a QUIC crypto error (0x100 + alert).
    pub const TLS_CERTIFICATE_REVOKED: u64 = 0x100 + 44;
}

/// What can go wrong in one exchange.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection is gone.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing the frame failed (the peer stopped the stream).
    #[error("write failed: {0}")]
    Write(quinn::WriteError),
    /// Reading the frame failed (the peer reset the stream, or it ended early).
    #[error("read failed: {0}")]
    Read(quinn::ReadExactError),
    /// The stream was already finished.
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// The frame itself is bad.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

// A lost connection is reported as such, with its cause (TLS alert, close reason),
// whichever stream operation noticed it.
impl From<quinn::WriteError> for ExchangeError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => ExchangeError::Connection(c),
            other => ExchangeError::Write(other),
        }
    }
}

impl From<quinn::ReadExactError> for ExchangeError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => {
                ExchangeError::Connection(c)
            }
            other => ExchangeError::Read(other),
        }
    }
}

impl ExchangeError {
    /// The application code the peer reset our receive stream with, if it did.
    pub fn reset_code(&self) -> Option<VarInt> {
        match self {
            ExchangeError::Read(quinn::ReadExactError::ReadError(quinn::ReadError::Reset(c))) => {
                Some(*c)
            }
            ExchangeError::Write(quinn::WriteError::Stopped(c)) => Some(*c),
            _ => None,
        }
    }

    /// The stream reset code that tells the peer why its frame was refused.
    pub fn stream_code(&self) -> VarInt {
        match self {
            ExchangeError::Frame(FrameError::TooLarge { .. }) => codes::STREAM_FRAME_TOO_LARGE,
            ExchangeError::Frame(FrameError::VersionMismatch { .. }) => {
                codes::STREAM_VERSION_MISMATCH
            }
            ExchangeError::Timeout(_) => codes::STREAM_TIMEOUT,
            _ => codes::STREAM_MALFORMED,
        }
    }
}

/// Reads one frame from `recv`, refusing payloads over `max_frame` from the header alone.
pub async fn read_frame(
    recv: &mut RecvStream,
    max_frame: usize,
) -> Result<Envelope, ExchangeError> {
    let mut header = [0u8; HEADER_LEN];
    recv.read_exact(&mut header).await?;
    let len = codec::payload_len(header, max_frame)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await?;
    Ok(codec::decode_payload(&payload)?)
}

/// Writes one frame carrying `message` and finishes the send half.
pub async fn write_frame(
    send: &mut SendStream,
    message: &Message,
    max_frame: usize,
) -> Result<(), ExchangeError> {
    send_frame(send, message, max_frame).await?;
    send.finish()?;
    Ok(())
}

/// Writes one frame and leaves the stream open for more (progress frames of a long
/// exchange; the last frame goes through [`write_frame`]).
pub async fn send_frame(
    send: &mut SendStream,
    message: &Message,
    max_frame: usize,
) -> Result<(), ExchangeError> {
    let bytes = codec::encode_frame(message, max_frame)?;
    send.write_all(&bytes).await?;
    Ok(())
}

/// Refuses a stream whose frame could not be read: resets our send half and stops the
/// peer's, both with the code that says why.
pub fn refuse_stream(send: &mut SendStream, recv: &mut RecvStream, error: &ExchangeError) {
    let code = error.stream_code();
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// Opens a stream, sends `message`, and waits up to `timeout` for the one answer.
pub async fn request(
    conn: &Connection,
    message: &Message,
    max_frame: usize,
    timeout: Duration,
) -> Result<Message, ExchangeError> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, message, max_frame).await?;
        Ok::<_, ExchangeError>(read_frame(&mut recv, max_frame).await?.message)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ExchangeError::Timeout(timeout))?
}

/// Transport settings for agent sessions.
///
/// Sized for thousands of mostly idle agents rather than bulk transfer: small
/// per-stream and per-connection windows (quinn's defaults allow ~10 MB per
/// connection), a handful of concurrent streams, keep-alive to hold NAT bindings, and
/// an idle timeout after which a silent peer is considered gone.
pub fn transport_config(
    idle_timeout: Duration,
    keep_alive: Duration,
    max_frame: usize,
) -> TransportConfig {
    let mut t = TransportConfig::default();
    let window = (max_frame as u64 + HEADER_LEN as u64).max(64 * 1024);
    t.stream_receive_window(VarInt::from_u64(window).unwrap_or(VarInt::MAX));
    t.receive_window(VarInt::from_u64(window * 2).unwrap_or(VarInt::MAX));
    t.send_window(window * 2);
    t.max_concurrent_bidi_streams(VarInt::from_u32(32));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Zero: no keep-alives of our own (the peer's packets keep the session alive).
    t.keep_alive_interval((!keep_alive.is_zero()).then_some(keep_alive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    t
}
