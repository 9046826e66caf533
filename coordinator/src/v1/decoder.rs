//! Streaming decoder for the v1 JSON protocol: Go's `json.Decoder` read the websocket as a byte
//! stream, so one message may hold several nodes and one node may span several messages.
//!
//! Never buffers more than the configured maximum: a peer that sends an endless value is cut off.

use serde_json::Value;

/// Why the byte stream could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not JSON.
    #[error("invalid JSON: {0}")]
    Syntax(String),
    /// An unfinished value grew beyond the limit.
    #[error("JSON value larger than {0} bytes")]
    TooLarge(usize),
}

/// Accumulates bytes and yields complete JSON values.
#[derive(Debug)]
pub struct JsonStream {
    buf: Vec<u8>,
    max: usize,
}

impl JsonStream {
    /// A decoder that refuses values longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Append `data` and return every value completed by it, in order.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Value>, DecodeError> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut consumed = 0;
        {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            loop {
                match it.next() {
                    None => {
                        consumed = self.buf.len();
                        break;
                    }
                    Some(Ok(v)) => {
                        consumed = it.byte_offset();
                        out.push(v);
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => return Err(DecodeError::Syntax(e.to_string())),
                }
            }
        }
        self.buf.drain(..consumed);
        // Leading whitespace of the unfinished tail does not count against the limit.
        let start = self
            .buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buf.len());
        self.buf.drain(..start);
        if self.buf.len() > self.max {
            return Err(DecodeError::TooLarge(self.max));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_and_split() {
        let mut s = JsonStream::new(1024);
        let v = s.push(br#"{"id":1}{"id":2} {"#).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(s.push(br#""id""#).unwrap().len(), 0);
        let v = s.push(b":3}\n").unwrap();
        assert_eq!(v, vec![serde_json::json!({"id":3})]);
        assert_eq!(s.push(b"   \n").unwrap().len(), 0);
        assert!(matches!(s.push(b"}"), Err(DecodeError::Syntax(_))));
    }

    #[test]
    fn bounded() {
        let mut s = JsonStream::new(16);
        assert_eq!(
            s.push(br#"{"id":"aaaaaaaaaaaaaaaaaaaaaaa"#),
            Err(DecodeError::TooLarge(16))
        );
    }
}
