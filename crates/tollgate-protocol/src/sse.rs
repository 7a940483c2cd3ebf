//! Splits a byte stream into server-sent events without copying more than needed: each event is
//! forwarded as the exact bytes the upstream sent, and its `event:`/`data:` fields are exposed
//! for inspection.

use bytes::{Bytes, BytesMut};

/// One complete event: the raw bytes (terminator included) and its parsed fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub raw: Bytes,
    /// The `event:` field, if any.
    pub name: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// An event grew beyond the limit without ending: the upstream is broken or hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server-sent event exceeds {limit_bytes} bytes")]
pub struct EventTooLarge {
    pub limit_bytes: usize,
}

/// Incremental splitter; feed it chunks as they arrive.
pub struct SseSplitter {
    buffer: BytesMut,
    event_bytes_max: usize,
}

impl SseSplitter {
    pub fn new(event_bytes_max: usize) -> SseSplitter {
        SseSplitter { buffer: BytesMut::new(), event_bytes_max }
    }

    /// Adds a chunk and returns the events it completed.
    ///
    /// # Errors
    /// `EventTooLarge` when buffered bytes without an event end pass the limit.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, EventTooLarge> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buffer) {
            let raw = self.buffer.split_to(end).freeze();
            events.push(parse_event(raw));
        }
        if self.buffer.len() > self.event_bytes_max {
            return Err(EventTooLarge { limit_bytes: self.event_bytes_max });
        }
        Ok(events)
    }

    /// Bytes received after the last complete event (a stream cut mid-event).
    pub fn pending_bytes(&self) -> usize {
        self.buffer.len()
    }
}

/// The index just past the blank line that ends the first event, if there is one.
fn event_end(buffer: &[u8]) -> Option<usize> {
    let mut index = 0;
    while index < buffer.len() {
        if buffer[index] == b'\n' {
            match buffer.get(index + 1) {
                Some(b'\n') => return Some(index + 2),
                Some(b'\r') if buffer.get(index + 2) == Some(&b'\n') => return Some(index + 3),
                _ => {}
            }
        }
        index += 1;
    }
    None
}

fn parse_event(raw: Bytes) -> SseEvent {
    let text = String::from_utf8_lossy(&raw);
    let mut name = None;
    let mut data = String::new();
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(value) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        } else if let Some(value) = line.strip_prefix("event:") {
            name = Some(value.trim().to_string());
        }
    }
    SseEvent { raw, name, data }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn events_split_across_chunks_come_out_whole_and_unchanged() {
        let stream = b"event: message_start\ndata: {\"a\":1}\n\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut splitter = SseSplitter::new(1024);
            let mut events = splitter.push(&stream[..cut]).unwrap();
            events.extend(splitter.push(&stream[cut..]).unwrap());
            assert_eq!(events.len(), 2, "cut at {cut}");
            assert_eq!(events[0].name.as_deref(), Some("message_start"));
            assert_eq!(events[0].data, "{\"a\":1}");
            assert_eq!(events[1].data, "[DONE]");
            let rejoined: Vec<u8> = events.iter().flat_map(|event| event.raw.to_vec()).collect();
            assert_eq!(rejoined, stream.to_vec());
            assert_eq!(splitter.pending_bytes(), 0);
        }
    }

    #[test]
    fn crlf_and_multiline_data_are_understood() {
        let mut splitter = SseSplitter::new(1024);
        let events = splitter.push(b"data: one\r\ndata: two\r\n\r\n").unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "one\ntwo");
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut splitter = SseSplitter::new(16);
        assert!(splitter.push(b"data: 0123456789").is_ok());
        assert_eq!(splitter.push(b"0123456789"), Err(EventTooLarge { limit_bytes: 16 }));
    }
}
