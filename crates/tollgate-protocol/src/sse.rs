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

/// The longest blank line that ends an event: "\n\r\n".
const EVENT_END_BYTES_MAX: usize = 3;

/// Incremental splitter; feed it chunks as they arrive.
pub struct SseSplitter {
    buffer: BytesMut,
    event_bytes_max: usize,
    /// Bytes at the buffer's start already searched for an event end, without one: the next
    /// chunk resumes the search there, so an event arriving in many pieces is searched once,
    /// not once per piece (which is quadratic in its size).
    searched_bytes: usize,
}

impl SseSplitter {
    pub fn new(event_bytes_max: usize) -> SseSplitter {
        SseSplitter { buffer: BytesMut::new(), event_bytes_max, searched_bytes: 0 }
    }

    /// Adds a chunk and returns the events it completed.
    ///
    /// # Errors
    /// `EventTooLarge` when buffered bytes without an event end pass the limit.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, EventTooLarge> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        // An event end may begin in the last bytes searched, completed by this chunk.
        let mut search_from = self.searched_bytes.saturating_sub(EVENT_END_BYTES_MAX - 1);
        while let Some(end) = event_end(&self.buffer, search_from) {
            let raw = self.buffer.split_to(end).freeze();
            events.push(parse_event(raw));
            search_from = 0;
        }
        self.searched_bytes = self.buffer.len();
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

/// The index just past the blank line that ends the first event, if there is one, searching
/// from `start` (no event end begins before it).
fn event_end(buffer: &[u8], start: usize) -> Option<usize> {
    let mut index = start;
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
    fn events_pushed_a_byte_at_a_time_come_out_whole() {
        let stream = b"data: a\r\n\r\nevent: e\ndata: b\n\n\n\r\ndata: c\n\r\n";
        let mut splitter = SseSplitter::new(1024);
        let mut events = Vec::new();
        for byte in stream {
            events.extend(splitter.push(&[*byte]).unwrap());
        }
        assert_eq!(events, SseSplitter::new(1024).push(stream).unwrap());
        let data: Vec<&str> = events.iter().map(|event| event.data.as_str()).collect();
        assert_eq!(data, ["a", "b", "", "c"]);
        assert_eq!(splitter.pending_bytes(), 0);
    }

    #[test]
    fn an_event_in_many_small_pieces_is_searched_once_not_once_per_piece() {
        // Each piece used to rescan the whole unfinished event: 64 Ki pieces of a 1 MiB event
        // took some 3 * 10^10 byte comparisons.
        let event_bytes_max = 1 << 20;
        let piece = [b'x'; 16];
        let started = std::time::Instant::now();
        let mut splitter = SseSplitter::new(event_bytes_max);
        assert!(splitter.push(b"data: ").unwrap().is_empty());
        for _ in 0..(event_bytes_max - 16) / piece.len() {
            assert!(splitter.push(&piece).unwrap().is_empty());
        }
        let events = splitter.push(b"\n\n").unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data.len(), event_bytes_max - 16);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
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
