//! Feeds arbitrary bytes to what `quic::read_frame` runs on a stream's bytes (the
//! header checked against the limit, then the payload decoded) and checks more than
//! "no crash": an oversized frame is refused from its header alone, and every
//! envelope that decodes re-encodes to exactly the bytes it came from.
//!
//! Run with `cargo +nightly fuzz run frame` from `protocol/`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use surplus_protocol::codec::{self, FrameError, HEADER_LEN};

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some(header) = data.get(..HEADER_LEN) else {
        return;
    };
    let declared = u32::from_be_bytes(header.try_into().expect("four bytes")) as usize;
    let len = match codec::payload_len(header.try_into().expect("four bytes"), MAX) {
        Ok(len) => len,
        Err(FrameError::TooLarge { len, max }) => {
            assert!(len > max && len == declared);
            return;
        }
        Err(e) => panic!("a header is refused only for its size: {e}"),
    };
    let Some(payload) = data.get(HEADER_LEN..HEADER_LEN + len) else {
        return;
    };
    match codec::decode_payload(payload) {
        Ok(envelope) => {
            let again = codec::encode_envelope(&envelope, MAX).expect("a decoded envelope re-encodes");
            assert_eq!(&again[..], &data[..HEADER_LEN + len], "decoding then encoding is the identity");
        }
        Err(FrameError::Malformed(_)) | Err(FrameError::VersionMismatch { .. }) => {}
        Err(e) => panic!("decoding never fails otherwise: {e}"),
    }
});
