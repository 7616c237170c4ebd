//! Feeds arbitrary bytes to the frame decoder, in arbitrary chunks, and checks more
//! than "no crash": the decoder never consumes more than it was given, an incomplete
//! frame consumes nothing, every decoded envelope re-encodes to exactly the bytes it
//! came from, and oversized frames are refused from their header.
//!
//! Run with `cargo +nightly fuzz run frame_decoder` from `protocol/`.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use surplus_protocol::codec::{self, FrameDecoder, FrameError, HEADER_LEN};

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let decoder = FrameDecoder::new(MAX);
    let mut buf = BytesMut::new();
    // The first byte picks a chunk size so partial input is exercised too.
    let chunk = data.first().map_or(1, |b| (*b as usize % 64) + 1);
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.clone();
            match decoder.decode(&mut buf) {
                Ok(None) => {
                    assert_eq!(buf, before, "incomplete input is left untouched");
                    break;
                }
                Ok(Some(envelope)) => {
                    let used = before.len() - buf.len();
                    assert!(used >= HEADER_LEN);
                    let again = codec::encode_envelope(&envelope, MAX).expect("a decoded envelope re-encodes");
                    assert_eq!(&again[..], &before[..used], "decoding then encoding is the identity");
                }
                Err(FrameError::TooLarge { len, max }) => {
                    assert!(len > max);
                    return;
                }
                Err(FrameError::Malformed(_)) | Err(FrameError::VersionMismatch { .. }) => return,
                Err(FrameError::Encode(e)) => panic!("decoding never encodes: {e}"),
            }
        }
    }
});
