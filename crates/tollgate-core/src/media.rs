//! Input the tokenizer cannot read — images, audio, video, documents — estimated from above,
//! per protocol (I7: input the gateway cannot count exactly is estimated from above, and any
//! excess is counted). Each number names its source. Where a provider documents a ceiling per
//! part (images) it is one; where it bills by duration or pages, the bound is derived from the
//! bytes the request carries, under a stated assumption about how small such bytes can be; a
//! file named by id or URL shows no bytes, and is counted in [`PromptEstimate::unsized_parts`]
//! for the gateway to hold at its configured default.


use serde_json::Value;

/// Tokens of a prompt as the gateway can know them before the upstream answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromptEstimate {
    /// Text the tokenizer read (message framing, text nested in tool calls, tool results and
    /// text documents included): what a report far below is checked against.
    pub text_tokens: u64,
    /// The ceilings of the media parts whose size the request shows.
    pub media_tokens_max: u64,
    /// Media parts with neither a documented ceiling nor visible bytes (a file by id or URL).
    pub unsized_parts: u64,
    /// What the parts name outside the request, for the provider to fetch or open: the walk
    /// that sizes the prompt finds them, the gateway's pass-through policy judges them.
    pub references: Vec<MediaReference>,
}

/// Something a media part names outside the request, which the upstream fetches or opens with
/// the operator's account or from the operator's network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MediaReference {
    /// A URL to fetch; `field` names where it was (`image_url.url`, `source.url`, …).
    Url { field: &'static str, url: String },
    /// A file in the provider account: OpenAI and Anthropic `file_id`, a Gemini `fileUri` in
    /// Cloud Storage (`gs://`) or the Files API.
    File { field: &'static str, id: String },
}

impl MediaReference {
    /// A Gemini `fileData.fileUri`: a file of the account (Cloud Storage, the Files API), or a
    /// URL for Google to fetch (a public page, a YouTube video).
    pub fn gemini_file_uri(uri: &str) -> MediaReference {
        const FILES_API: &str = "https://generativelanguage.googleapis.com/";
        let field = "fileData.fileUri";
        if uri.starts_with("gs://") || (uri.starts_with(FILES_API) && uri.contains("/files/")) {
            MediaReference::File { field, id: uri.to_string() }
        } else {
            MediaReference::Url { field, url: uri.to_string() }
        }
    }

    /// The references of one OpenAI- or Anthropic-protocol content part: OpenAI's `image_url`
    /// (and vLLM's `audio_url`, `video_url`), `input_image`, a `file` by id; an Anthropic
    /// `image` or `document` whose source is a URL or a file. Inline data (`data:` URLs, base64)
    /// names nothing outside.
    pub fn of_part(part: &Value, references: &mut Vec<MediaReference>) {
        let text = |pointer: &str| part.pointer(pointer).and_then(Value::as_str).map(str::to_string);
        let mut url = |field: &'static str, url: Option<String>| {
            if let Some(url) = url.filter(|url| !url.starts_with("data:")) {
                references.push(MediaReference::Url { field, url });
            }
        };
        url("image_url.url", text("/image_url/url"));
        url("image_url", text("/image_url"));
        url("audio_url.url", text("/audio_url/url"));
        url("video_url.url", text("/video_url/url"));
        url("source.url", text("/source/url"));
        let files = [("file.file_id", text("/file/file_id")), ("source.file_id", text("/source/file_id")), ("file_id", text("/file_id"))];
        references.extend(files.into_iter().filter_map(|(field, id)| Some(MediaReference::File { field, id: id? })));
    }
}

impl PromptEstimate {
    /// Text plus media ceilings: the prompt held for, before any unsized part.
    pub fn tokens_max(&self) -> u64 {
        self.text_tokens.saturating_add(self.media_tokens_max)
    }

    pub fn add_text(&mut self, tokens: u64) {
        self.text_tokens = self.text_tokens.saturating_add(tokens);
    }

    pub fn add_media(&mut self, tokens: u64) {
        self.media_tokens_max = self.media_tokens_max.saturating_add(tokens);
    }

    pub fn add_unsized(&mut self) {
        self.unsized_parts = self.unsized_parts.saturating_add(1);
    }
}

/// Gemini bills audio at 32 tokens per second ("Understand and count tokens", Gemini API docs);
/// the highest per-second rate a provider documents, so used for every protocol.
pub const AUDIO_TOKENS_PER_SECOND_MAX: u64 = 32;
/// Audio is assumed to be encoded at 6 kbit/s or more (the lowest rate of Opus speech and
/// below MP3's lowest, 8 kbit/s), so its seconds are at most its bytes / 750.
pub const AUDIO_BYTES_PER_SECOND_MIN: u64 = 750;
/// Gemini bills video at 263 tokens per second (frames at 258 plus their audio, same docs).
pub const VIDEO_TOKENS_PER_SECOND_MAX: u64 = 263;
/// Video is assumed to be encoded at 100 kbit/s or more; a lower rate is under-held (an
/// estimate, not a bound: a still picture can be encoded lower).
pub const VIDEO_BYTES_PER_SECOND_MIN: u64 = 12_500;
/// Text carried as bytes: a token is at least one byte, in every tokenizer, so a bound.
const TEXT_TOKENS_PER_KIB: u64 = 1_024;
const KIB: u64 = 1_024;

/// What one media part is held at, per protocol (and for OpenAI, per model family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MediaBounds {
    /// One image, whatever its size.
    pub image_tokens_max: u64,
    /// One image sent with OpenAI's `detail: "low"`, where a tile-based model bills a fixed budget.
    pub low_detail_image_tokens_max: u64,
    /// An inline document (a PDF), per KiB of its decoded bytes: an estimate, since a page's
    /// text and its bytes are not bound to each other (compression).
    pub document_tokens_per_kib: u64,
}

impl MediaBounds {
    /// Anthropic resizes an image above about 1.15 megapixels before the model sees it, and
    /// bills width × height / 750 tokens: at most about 1,600 ("Vision", Anthropic docs). A PDF
    /// page bills its text (1,500–3,000 tokens typically) plus its image (≤ 1,600) (the "PDF
    /// support" docs): one token per byte is above that for pages of a few KiB and more.
    pub const ANTHROPIC: MediaBounds =
        MediaBounds { image_tokens_max: 1_600, low_detail_image_tokens_max: 1_600, document_tokens_per_kib: 1_024 };

    /// Gemini 2.x bills an image at 258 tokens per 768×768 tile and scales it to at most
    /// 3072×3072 first: 16 tiles, 4,128 (Gemini 3 bills at most 1,120 at high resolution). A
    /// PDF page is 258 tokens ("Document understanding"): one page per KiB is assumed.
    pub const GEMINI: MediaBounds =
        MediaBounds { image_tokens_max: 16 * 258, low_detail_image_tokens_max: 16 * 258, document_tokens_per_kib: 258 };

    /// OpenAI's tile-based models (gpt-4o, gpt-4.1, gpt-5, o1, o3, …): a high-detail image is
    /// scaled into 2048×2048, then its short side to 768, and billed base + per 512-px tile:
    /// at most 8 tiles (2048×768), 85 + 8 × 170 = 1,445 at gpt-4o's rates, the highest of the
    /// family; low detail is the base, 85 ("Images and vision", "Calculating costs", OpenAI docs).
    const OPENAI_TILES: MediaBounds =
        MediaBounds { image_tokens_max: 85 + 8 * 170, low_detail_image_tokens_max: 85, document_tokens_per_kib: 1_024 };

    /// gpt-4o-mini bills images at base 2,833 + 5,667 per tile (same docs): 48,169 at most.
    const OPENAI_4O_MINI: MediaBounds =
        MediaBounds { image_tokens_max: 2_833 + 8 * 5_667, low_detail_image_tokens_max: 2_833, document_tokens_per_kib: 1_024 };

    /// Patch-based models bill 32-px patches, at most 1,536, times a multiplier of at most 2.46
    /// (gpt-4.1-nano, gpt-5-nano; same docs): 3,779. Also the ceiling for any model the table
    /// does not know (an OpenAI-compatible server's vision model may bill more; the excess is
    /// then counted, see the README).
    const OPENAI_PATCHES: MediaBounds =
        MediaBounds { image_tokens_max: 3_779, low_detail_image_tokens_max: 3_779, document_tokens_per_kib: 1_024 };

    /// The bounds of an OpenAI-protocol model, by its name (routing and fine-tune prefixes and
    /// case ignored, as for its encoding).
    pub fn openai(model: &str) -> MediaBounds {
        const PATCH_PREFIXES: [&str; 5] = ["gpt-4.1-mini", "gpt-4.1-nano", "gpt-5-mini", "gpt-5-nano", "o4-mini"];
        const TILE_PREFIXES: [&str; 8] = ["gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-4-turbo", "gpt-5", "o1", "o3"];
        let model = crate::tokens::model_family_name(model);
        if model.starts_with("gpt-4o-mini") {
            MediaBounds::OPENAI_4O_MINI
        } else if PATCH_PREFIXES.iter().any(|prefix| model.starts_with(prefix)) {
            MediaBounds::OPENAI_PATCHES
        } else if TILE_PREFIXES.iter().any(|prefix| model.starts_with(prefix)) {
            MediaBounds::OPENAI_TILES
        } else {
            MediaBounds::OPENAI_PATCHES
        }
    }

    /// Tokens of an inline media part of this MIME type carrying `base64_chars` of base64.
    pub fn inline_tokens_max(&self, mime_type: &str, base64_chars: usize) -> u64 {
        let bytes = decoded_bytes(base64_chars);
        let mime_type = mime_type.trim().to_ascii_lowercase();
        if mime_type.starts_with("image/") {
            self.image_tokens_max
        } else if mime_type.starts_with("audio/") {
            bytes.div_ceil(AUDIO_BYTES_PER_SECOND_MIN).saturating_mul(AUDIO_TOKENS_PER_SECOND_MAX)
        } else if mime_type.starts_with("video/") {
            bytes.div_ceil(VIDEO_BYTES_PER_SECOND_MIN).saturating_mul(VIDEO_TOKENS_PER_SECOND_MAX)
        } else if mime_type.starts_with("text/") {
            bytes.div_ceil(KIB).saturating_mul(TEXT_TOKENS_PER_KIB)
        } else {
            // PDFs, and any type not known here: the document estimate.
            bytes.div_ceil(KIB).saturating_mul(self.document_tokens_per_kib)
        }
    }
}

/// Bytes that `base64_chars` of base64 decode to, at most.
fn decoded_bytes(base64_chars: usize) -> u64 {
    u64::try_from(base64_chars).unwrap_or(u64::MAX).div_ceil(4).saturating_mul(3)
}

/// A `data:` URL's MIME type and base64 payload, if it is one (`data:audio/wav;base64,…`).
pub fn data_url(url: &str) -> Option<(&str, &str)> {
    let (header, payload) = url.strip_prefix("data:")?.split_once(',')?;
    Some((header.split(';').next().unwrap_or_default(), payload))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn openai_models_get_their_family_ceiling() {
        assert_eq!(MediaBounds::openai("gpt-4o").image_tokens_max, 1_445);
        assert_eq!(MediaBounds::openai("openai/GPT-4o-2024-08-06").low_detail_image_tokens_max, 85);
        assert_eq!(MediaBounds::openai("gpt-4o-mini").image_tokens_max, 48_169);
        assert_eq!(MediaBounds::openai("ft:gpt-4o-mini:org::x").low_detail_image_tokens_max, 2_833);
        for patch in ["gpt-4.1-nano", "gpt-5-mini", "o4-mini", "llava-next", "demo-gpt"] {
            assert_eq!(MediaBounds::openai(patch).image_tokens_max, 3_779, "{patch}");
        }
        for tile in ["gpt-4.1", "gpt-5", "o3", "o1-preview"] {
            assert_eq!(MediaBounds::openai(tile).image_tokens_max, 1_445, "{tile}");
        }
    }

    #[test]
    fn inline_media_is_bounded_by_its_bytes() {
        let bounds = MediaBounds::GEMINI;
        assert_eq!(bounds.inline_tokens_max("image/png", 10), 4_128);
        // 7,500 bytes of audio (10,000 base64 chars) is at most 10 s at 6 kbit/s: 320 tokens.
        assert_eq!(bounds.inline_tokens_max("audio/mp3", 10_000), 10 * 32);
        assert_eq!(bounds.inline_tokens_max("video/mp4", 16_668), 263 * 2);
        assert_eq!(bounds.inline_tokens_max("application/pdf", 4), 258);
        assert_eq!(bounds.inline_tokens_max("text/plain", 4), 1_024);
        assert_eq!(MediaBounds::ANTHROPIC.inline_tokens_max("application/pdf", 4 * 512), 2 * 1_024);
        assert_eq!(bounds.inline_tokens_max("audio/wav", 0), 0);
        assert!(bounds.inline_tokens_max("AUDIO/WAV", usize::MAX) > 1 << 50, "no overflow, case ignored");
        assert_eq!(data_url("data:audio/wav;base64,AAAA"), Some(("audio/wav", "AAAA")));
        assert_eq!(data_url("https://example.com/a.png"), None);
    }
}
