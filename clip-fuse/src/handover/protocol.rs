//! The keeper's wire protocol: every message between the daemon and the keeper, typed, with its
//! encoding and decoding in one place.
//!
//! Owns [`Message`]; uses only [`super::OpenState`]. The client (`client.rs`) and the keeper
//! (`server.rs`) build and read messages only through it.
//!
//! Each message is one `SOCK_SEQPACKET` packet of ASCII words (at most [`MAX_MSG`] bytes); a
//! descriptor travels beside [`Message::Hold`] and [`Message::Held`]. The words are the same as
//! before the protocol had a type (a keeper started by an older daemon still understands a newer
//! one across an upgrade):
//!
//! | direction | message | words |
//! |---|---|---|
//! | daemon -> keeper | hold a connection (+ fd) | `P id caps minor` |
//! | daemon -> keeper | drop it | `D id` |
//! | daemon -> keeper | an open | `O id ino c`, `O id ino p backing` |
//! | daemon -> keeper | a release | `R id ino` |
//! | daemon -> keeper | list | `L` |
//! | keeper -> daemon | a held connection (+ fd) | `H id caps minor` |
//! | keeper -> daemon | an open inode | `S id ino c 0 count`, `S id ino p backing count` |
//! | keeper -> daemon | end of the list | `E` |

use super::OpenState;

/// The largest message, in bytes.
pub const MAX_MSG: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// Keep connection `id` (its descriptor travels with the message).
    Hold { id: u64, caps: u64, minor: u32 },
    /// Close connection `id`: it is being unmounted.
    Drop { id: u64 },
    /// Inode `ino` of connection `id` was opened in `state`.
    Open { id: u64, ino: u64, state: OpenState },
    /// Inode `ino` of connection `id` was released once.
    Release { id: u64, ino: u64 },
    /// Send every held connection, then [`Message::End`].
    List,
    /// A held connection (its descriptor travels with the message).
    Held { id: u64, caps: u64, minor: u32 },
    /// An inode of connection `id` open `count` times in `state`.
    Opened {
        id: u64,
        ino: u64,
        state: OpenState,
        count: u32,
    },
    /// The end of the answer to [`Message::List`].
    End,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad keeper message {text:?}: {reason}")]
pub struct ProtocolError {
    /// The message, lossily decoded and cut to [`MAX_MSG`] bytes.
    pub text: String,
    pub reason: &'static str,
}

impl Message {
    /// Whether a descriptor travels with the message.
    pub fn carries_fd(&self) -> bool {
        matches!(self, Message::Hold { .. } | Message::Held { .. })
    }

    /// The message's words.
    pub fn encode(&self) -> Vec<u8> {
        let mode = |s: &OpenState| match s {
            OpenState::Cached => ("c", 0),
            OpenState::Passthrough(b) => ("p", *b),
        };
        match self {
            Message::Hold { id, caps, minor } => format!("P {id} {caps} {minor}"),
            Message::Drop { id } => format!("D {id}"),
            Message::Open { id, ino, state } => match state {
                OpenState::Cached => format!("O {id} {ino} c"),
                OpenState::Passthrough(b) => format!("O {id} {ino} p {b}"),
            },
            Message::Release { id, ino } => format!("R {id} {ino}"),
            Message::List => "L".into(),
            Message::Held { id, caps, minor } => format!("H {id} {caps} {minor}"),
            Message::Opened {
                id,
                ino,
                state,
                count,
            } => {
                let (m, b) = mode(state);
                format!("S {id} {ino} {m} {b} {count}")
            }
            Message::End => "E".into(),
        }
        .into_bytes()
    }

    /// The message `bytes` carry; anything else (unknown words, missing or extra fields,
    /// numbers out of range, over [`MAX_MSG`] bytes) is an error.
    pub fn decode(bytes: &[u8]) -> Result<Message, ProtocolError> {
        let fail = |reason| ProtocolError {
            text: String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_MSG)]).into_owned(),
            reason,
        };
        if bytes.len() > MAX_MSG {
            return Err(fail("too long"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| fail("not ASCII"))?;
        let w: Vec<&str> = text.split_ascii_whitespace().collect();
        let num = |i: usize| -> Result<u64, ProtocolError> {
            w.get(i)
                .ok_or(fail("a field is missing"))?
                .parse()
                .map_err(|_| fail("a field is not a number"))
        };
        let small = |i: usize| -> Result<u32, ProtocolError> {
            u32::try_from(num(i)?).map_err(|_| fail("a field is out of range"))
        };
        let state = |i: usize| -> Result<OpenState, ProtocolError> {
            match w.get(i).copied() {
                Some("c") => Ok(OpenState::Cached),
                Some("p") => Ok(OpenState::Passthrough(small(i + 1)?)),
                _ => Err(fail("unknown open mode")),
            }
        };
        let (msg, fields) = match w.first().copied() {
            Some("P") => (
                Message::Hold {
                    id: num(1)?,
                    caps: num(2)?,
                    minor: small(3)?,
                },
                4,
            ),
            Some("D") => (Message::Drop { id: num(1)? }, 2),
            Some("O") => {
                let state = state(3)?;
                let n = if matches!(state, OpenState::Cached) {
                    4
                } else {
                    5
                };
                let msg = Message::Open {
                    id: num(1)?,
                    ino: num(2)?,
                    state,
                };
                (msg, n)
            }
            Some("R") => (
                Message::Release {
                    id: num(1)?,
                    ino: num(2)?,
                },
                3,
            ),
            Some("L") => (Message::List, 1),
            Some("H") => (
                Message::Held {
                    id: num(1)?,
                    caps: num(2)?,
                    minor: small(3)?,
                },
                4,
            ),
            Some("S") => {
                // The backing id is always written (0 for a cached open).
                let state = match w.get(3).copied() {
                    Some("c") => {
                        num(4)?;
                        OpenState::Cached
                    }
                    _ => state(3)?,
                };
                let msg = Message::Opened {
                    id: num(1)?,
                    ino: num(2)?,
                    state,
                    count: small(5)?,
                };
                (msg, 6)
            }
            Some("E") => (Message::End, 1),
            Some(_) => return Err(fail("unknown message")),
            None => return Err(fail("empty")),
        };
        if w.len() != fields {
            return Err(fail("wrong number of fields"));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Message> {
        vec![
            Message::Hold {
                id: u64::MAX,
                caps: 1 << 41,
                minor: 44,
            },
            Message::Drop { id: 7 },
            Message::Open {
                id: 7,
                ino: 12,
                state: OpenState::Cached,
            },
            Message::Open {
                id: 7,
                ino: 13,
                state: OpenState::Passthrough(3),
            },
            Message::Release { id: 7, ino: 12 },
            Message::List,
            Message::Held {
                id: 7,
                caps: 0,
                minor: u32::MAX,
            },
            Message::Opened {
                id: 7,
                ino: 12,
                state: OpenState::Cached,
                count: 2,
            },
            Message::Opened {
                id: 7,
                ino: 13,
                state: OpenState::Passthrough(9),
                count: 1,
            },
            Message::End,
        ]
    }

    #[test]
    fn every_message_survives_a_round_trip() {
        for m in every_kind() {
            let bytes = m.encode();
            assert!(bytes.len() <= MAX_MSG);
            assert_eq!(
                Message::decode(&bytes),
                Ok(m),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn the_words_are_the_ones_older_keepers_speak() {
        let open = Message::Open {
            id: 1,
            ino: 2,
            state: OpenState::Passthrough(3),
        };
        assert_eq!(open.encode(), b"O 1 2 p 3");
        let opened = Message::Opened {
            id: 1,
            ino: 2,
            state: OpenState::Cached,
            count: 4,
        };
        assert_eq!(opened.encode(), b"S 1 2 c 0 4");
        assert_eq!(Message::decode(b"P 5 6 7").unwrap().encode(), b"P 5 6 7");
    }

    #[test]
    fn malformed_messages_are_errors() {
        for bad in [
            &b""[..],
            b"X 1",
            b"P 1 2",
            b"P 1 2 3 4",
            b"P 1 2 4294967296",
            b"O 1 2 p",
            b"O 1 2 q 3",
            b"D -1",
            b"S 1 2 c 0",
            b"\xff",
        ] {
            assert!(
                Message::decode(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(Message::decode(&[b'L'; MAX_MSG + 1]).is_err());
    }
}
