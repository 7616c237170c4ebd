//! The agent's local socket, `<data_dir>/agent.sock` (mode 0600: the agent's own
//! user and root only): how a command on this host asks the running agent to send a
//! request over its session, since a second session with the agent's identity would
//! replace the first. One JSON line in, one JSON line out; today the only request is
//! the provider's reclaim (`surplus-agent reclaim`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::Connection;
use serde::{Deserialize, Serialize};
use surplus_protocol::messages::{Message, ReclaimRequest, Reclaimed};
use surplus_protocol::quic;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// The socket's file under the data directory.
pub const SOCKET_FILE: &str = "agent.sock";

/// Longest request line read.
const MAX_LINE: usize = 64 << 10;

/// The session a request goes over, while one is open.
pub type Current = Arc<Mutex<Option<Connection>>>;

/// A request to the running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalRequest {
    /// Take this host's capacity back for the provider's own customers.
    Reclaim(ReclaimRequest),
}

/// The running agent's answer: the controller's, or why it could not be asked.
pub type LocalAnswer = Result<Vec<Reclaimed>, String>;

/// Binds the socket at `path` (a stale one left by a crash is replaced), readable
/// and writable by the agent's user only.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the socket until `cancel`: each connection one request, forwarded over the
/// current session and answered within `timeout`.
pub async fn serve(
    listener: UnixListener,
    current: Current,
    max_frame: usize,
    timeout: Duration,
    cancel: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "local socket");
                    continue;
                }
            },
        };
        let current = current.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, current, max_frame, timeout).await {
                tracing::debug!(error = %e, "local request not answered");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    current: Current,
    max_frame: usize,
    timeout: Duration,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut read = BufReader::new(read).take(MAX_LINE as u64);
    // A client that sends nothing does not hold a task for ever.
    tokio::time::timeout(Duration::from_secs(10), read.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request line"))??;
    let answer: LocalAnswer = match serde_json::from_str::<LocalRequest>(&line) {
        Err(e) => Err(format!("not a request: {e}")),
        Ok(LocalRequest::Reclaim(request)) => {
            let conn = current.lock().expect("not poisoned").clone();
            match conn {
                None => Err("the agent has no session with the controller now; try again".into()),
                Some(conn) => {
                    tracing::info!(count = ?request.count, instance = ?request.instance, "reclaim asked on this host");
                    match quic::request(&conn, &Message::Reclaim(request), max_frame, timeout).await
                    {
                        Ok(Message::ReclaimResult(result)) => result,
                        Ok(other) => Err(format!("the controller answered {}", other.kind())),
                        Err(e) => Err(format!("the controller could not be asked: {e}")),
                    }
                }
            }
        }
    };
    let mut text = serde_json::to_string(&answer).expect("answers serialize");
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// Asks the agent running with the socket at `path`.
pub async fn ask(path: &Path, request: &LocalRequest) -> std::io::Result<LocalAnswer> {
    let stream = UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request).expect("requests serialize");
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read)
        .take(MAX_LINE as u64)
        .read_line(&mut line)
        .await?;
    serde_json::from_str(&line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the agent's answer: {e}"),
        )
    })
}
