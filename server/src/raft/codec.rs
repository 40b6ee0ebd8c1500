//! How Raft's data is encoded: log entries, snapshots, stored metadata and
//! the messages between servers are MessagePack (field names kept, so every
//! serde attribute of the state's types means what it means in JSON; byte
//! strings such as KV values as binary, not as lists of numbers). A 512 KiB
//! value costs about 512 KiB, where JSON spent 3 to 4 bytes per byte.
//!
//! Data written by an earlier version as JSON is still read: a JSON document
//! of ours starts with an ASCII character, a MessagePack one of ours (a map,
//! an array or a string) with a byte of 0x80 or above.
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encoding: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("decoding JSON of an earlier version: {0}")]
    Json(#[from] serde_json::Error),
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// The length `encode` would give, counted without keeping the bytes.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // A value that does not encode fails again, with its error, in `encode`.
    let _ = rmp_serde::encode::write_named(&mut count, value);
    count.0
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.first() {
        Some(b) if *b < 0x80 => Ok(serde_json::from_slice(bytes)?),
        _ => Ok(rmp_serde::from_slice(bytes)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;

    #[test]
    fn a_value_costs_about_its_size_and_json_of_old_still_reads() {
        let cmd = Command::KvPut {
            key: "k".into(),
            value: vec![7; 512 * 1024],
            cas: Some(3),
            flags: 0,
            lock: None,
        };
        let bytes = encode(&cmd).unwrap();
        assert!(bytes.len() < 512 * 1024 + 64, "{} bytes", bytes.len());
        assert_eq!(encoded_len(&cmd), bytes.len());
        assert_eq!(decode::<Command>(&bytes).unwrap(), cmd);
        let old = serde_json::to_vec(&cmd).unwrap();
        assert!(old.len() > 3 * bytes.len() / 2);
        assert_eq!(decode::<Command>(&old).unwrap(), cmd);
    }

    #[test]
    fn the_whole_state_round_trips() {
        let mut state = crate::state::State::default();
        state.apply(
            Command::Once {
                client: "c".into(),
                request: "r".into(),
                cmd: Box::new(Command::KvPut {
                    key: "a".into(),
                    value: b"x".to_vec(),
                    cas: None,
                    flags: 0,
                    lock: None,
                }),
                standing: None,
            },
            1,
        );
        let bytes = encode(&state).unwrap();
        assert_eq!(decode::<crate::state::State>(&bytes).unwrap(), state);
    }
}
