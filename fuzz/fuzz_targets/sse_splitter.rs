//! The server-sent event splitter, fed a stream cut at arbitrary points.
//!
//! Input: a head byte, whose low five bits are a chunk count `n` and high three bits choose the
//! event size limit (8 << bits: 8 to 1024 bytes); then `n` chunk lengths of one byte each; then
//! the stream, pushed in chunks of those lengths (0 is an empty chunk) and the rest in one last
//! chunk. Properties:
//! - events are forwarded byte-exact: their `raw` bytes, concatenated, are a prefix of the
//!   stream, and with the pending bytes they are everything pushed so far;
//! - each event is exactly one event: it ends at a blank line and holds no earlier one; it has a
//!   name only if a line names it, and data only if a line carries some;
//! - cutting the stream changes nothing: the events (raw bytes and fields) are those of the
//!   whole stream pushed at once, up to an `EventTooLarge`;
//! - the buffer never holds more than the limit without `EventTooLarge`, and that error comes
//!   only when it does.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_protocol::{EventTooLarge, SseEvent, SseSplitter};

/// The head byte's bits that count the chunk lengths; the others choose the limit.
const CHUNK_COUNT_BITS: u8 = 0b1_1111;

/// The smallest event size limit tried; small limits are reached often.
const EVENT_BYTES_MAX_SMALLEST: usize = 8;

fuzz_target!(|input: &[u8]| {
    let Some((&head, rest)) = input.split_first() else { return };
    let chunk_count = usize::from(head & CHUNK_COUNT_BITS);
    let event_bytes_max = EVENT_BYTES_MAX_SMALLEST << (head >> 5);
    if rest.len() < chunk_count {
        return;
    }
    let (chunk_lengths, stream) = rest.split_at(chunk_count);

    let whole = split_whole(stream);
    let mut splitter = SseSplitter::new(event_bytes_max);
    let mut events: Vec<SseEvent> = Vec::new();
    let mut pushed = 0;
    let mut refused = false;
    for chunk in chunks(stream, chunk_lengths) {
        pushed += chunk.len();
        match splitter.push(chunk) {
            Ok(completed) => {
                events.extend(completed);
                assert!(splitter.pending_bytes() <= event_bytes_max, "{} bytes buffered without an error", splitter.pending_bytes());
                let forwarded: usize = events.iter().map(|event| event.raw.len()).sum();
                assert_eq!(forwarded + splitter.pending_bytes(), pushed, "bytes lost or invented");
            }
            Err(EventTooLarge { limit_bytes }) => {
                assert_eq!(limit_bytes, event_bytes_max);
                assert!(splitter.pending_bytes() > event_bytes_max, "refused at {} bytes buffered", splitter.pending_bytes());
                refused = true;
                break;
            }
        }
    }

    let forwarded: Vec<u8> = events.iter().flat_map(|event| event.raw.iter().copied()).collect();
    assert!(stream.starts_with(&forwarded), "the forwarded bytes are not the stream's");
    for event in &events {
        assert_one_event(&event.raw);
        assert_fields_come_from_their_lines(event);
    }
    assert!(events.len() <= whole.events.len(), "more events in pieces than whole");
    assert_eq!(events[..], whole.events[..events.len()], "cutting the stream changed its events");
    if !refused {
        assert_eq!(events.len(), whole.events.len(), "events missing when cut");
        assert_eq!(splitter.pending_bytes(), whole.pending_bytes);
    }

    // The stream pushed at once is refused exactly when its unfinished tail is over the limit.
    let at_once = SseSplitter::new(event_bytes_max).push(stream);
    match at_once {
        Ok(at_once) => {
            assert!(whole.pending_bytes <= event_bytes_max);
            assert_eq!(at_once, whole.events);
        }
        Err(_) => assert!(whole.pending_bytes > event_bytes_max),
    }
});

/// The stream pushed at once into a splitter without a practical limit.
struct Whole {
    events: Vec<SseEvent>,
    pending_bytes: usize,
}

fn split_whole(stream: &[u8]) -> Whole {
    let mut splitter = SseSplitter::new(usize::MAX);
    let events = splitter.push(stream).unwrap_or_default();
    let pending_bytes = splitter.pending_bytes();
    assert_eq!(events.iter().map(|event| event.raw.len()).sum::<usize>() + pending_bytes, stream.len());
    Whole { events, pending_bytes }
}

/// The stream cut at the given lengths, then the rest in one chunk.
fn chunks<'a>(stream: &'a [u8], lengths: &[u8]) -> Vec<&'a [u8]> {
    let mut pieces = Vec::with_capacity(lengths.len() + 1);
    let mut rest = stream;
    for &length in lengths {
        let (piece, after) = rest.split_at(usize::from(length).min(rest.len()));
        pieces.push(piece);
        rest = after;
    }
    pieces.push(rest);
    pieces
}

/// An event ends at its first blank line ("\n\n" or "\n\r\n"), and only there.
fn assert_one_event(raw: &[u8]) {
    assert!(raw.ends_with(b"\n\n") || raw.ends_with(b"\n\r\n"), "an event without a blank line at its end: {raw:?}");
    // A blank line ending before the last byte would have ended the event there.
    let before_last = &raw[..raw.len() - 1];
    let blank_line_inside = before_last.windows(2).any(|pair| pair == b"\n\n") || before_last.windows(3).any(|triple| triple == b"\n\r\n");
    assert!(!blank_line_inside, "two events forwarded as one: {raw:?}");
}

/// A name comes from an `event:` line, data from `data:` lines; nothing else makes them.
fn assert_fields_come_from_their_lines(event: &SseEvent) {
    let has_line = |prefix: &[u8]| event.raw.split(|byte| *byte == b'\n').any(|line| line.starts_with(prefix));
    assert_eq!(event.name.is_some(), has_line(b"event:"), "{event:?}");
    if !has_line(b"data:") {
        assert!(event.data.is_empty(), "data without a data line: {event:?}");
    }
}
