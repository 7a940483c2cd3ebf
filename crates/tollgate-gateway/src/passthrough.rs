//! What a client may have an upstream fetch or open on the operator's behalf (issue 21 item 9).
//! A media part can name a file in the provider account (`file_id`, a `gs://` URI) — opened
//! with the operator's credentials — or a URL the provider fetches, which a self-hosted server
//! (vLLM) fetches from inside the operator's network, where the cloud metadata service and the
//! databases answer. The walk that sizes the prompt finds them ([`MediaReference`]); each
//! provider's policy ([`ClientFileReferences`], [`ClientUrls`]) says which pass, and a request
//! naming another is refused before anything is held or sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tollgate_core::MediaReference;

use crate::config::{ClientFileReferences, ClientUrls};
use crate::error::ApiError;
use crate::upstream::Provider;

/// Domains that name no host on the public internet: RFC 6761 (`localhost`), 6762 (`local`),
/// 8375 (`home.arpa`), `internal` (reserved for private use, where cloud metadata services
/// live: `metadata.google.internal`), and two common private ones.
const LOCAL_DOMAINS: [&str; 6] = ["localhost", "local", "internal", "home.arpa", "localdomain", "lan"];

/// Refuses the first reference the provider's policy does not allow.
///
/// # Errors
/// `InvalidRequest` naming the field and the policy.
pub fn check(provider: &Provider, references: &[MediaReference]) -> Result<(), ApiError> {
    match references.iter().find_map(|reference| refusal(&provider.name, provider.client_file_references, provider.client_urls, reference)) {
        Some(message) => Err(ApiError::InvalidRequest(message)),
        None => Ok(()),
    }
}

/// Why `reference` is refused under these policies, if it is.
fn refusal(provider: &str, files: ClientFileReferences, urls: ClientUrls, reference: &MediaReference) -> Option<String> {
    match (reference, files, urls) {
        (MediaReference::File { field, .. }, ClientFileReferences::Refuse, _) => Some(format!(
            "{field} names a file in the provider's account, which provider {provider} does not open for clients (client_file_references = \"refuse\"); send the content inline"
        )),
        (MediaReference::Url { field, .. }, _, ClientUrls::Refuse) => {
            Some(format!("{field}: provider {provider} fetches no URLs for clients (client_urls = \"refuse\"); send the content inline"))
        }
        (MediaReference::Url { field, url }, _, ClientUrls::PublicOnly) => not_public(url).map(|reason| {
            format!("{field} {reason}; provider {provider} fetches only public http(s) URLs for clients (client_urls = \"public_only\")")
        }),
        _ => None,
    }
}

/// Why `url` is not a public http(s) URL, if it is not. The host is judged as written — after
/// the URL standard's parsing, which reads `2130706433`, `0x7f.1` and `0177.0.0.1` as
/// 127.0.0.1, as curl and the servers' HTTP clients do; a name is not resolved.
pub fn not_public(url: &str) -> Option<&'static str> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Some("is not a URL");
    };
    if !matches!(parsed.scheme(), "http" | "https") {
        return Some("is not an http(s) URL");
    }
    let host = parsed.host_str().unwrap_or_default();
    let literal = host.strip_prefix('[').and_then(|host| host.strip_suffix(']')).unwrap_or(host);
    let public = match literal.parse::<IpAddr>() {
        Ok(IpAddr::V4(address)) => is_public_v4(address),
        Ok(IpAddr::V6(address)) => is_public_v6(address),
        Err(_) => !host.is_empty() && !is_local_name(host),
    };
    (!public).then_some("names this machine or a private network")
}

/// A name with no dot (resolved through search domains: `metadata`, `redis`), or in a local-only
/// domain.
fn is_local_name(host: &str) -> bool {
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    !name.contains('.') || LOCAL_DOMAINS.iter().any(|domain| name.strip_suffix(domain).is_some_and(|rest| rest.is_empty() || rest.ends_with('.')))
}

fn is_public_v4(address: Ipv4Addr) -> bool {
    let [first, second, third, _] = address.octets();
    let special = address.is_private()
        || address.is_loopback()
        || address.is_link_local() // 169.254/16: the cloud metadata service, 169.254.169.254
        || address.is_unspecified()
        || address.is_broadcast()
        || address.is_multicast()
        || address.is_documentation()
        || first == 0 // "this network": 0.0.0.0 reaches the local host
        || (first == 100 && (64..128).contains(&second)) // carrier-grade NAT (RFC 6598)
        || (first == 192 && second == 0 && third == 0) // IETF protocol assignments
        || (first == 198 && (second == 18 || second == 19)) // benchmarking (RFC 2544)
        || first >= 240; // reserved
    !special
}

fn is_public_v6(address: Ipv6Addr) -> bool {
    if let Some(carried) = carried_v4(address) {
        return is_public_v4(carried);
    }
    let [first, second, ..] = address.segments();
    let special = address.is_loopback()
        || address.is_unspecified()
        || address.is_multicast()
        || address.is_unique_local() // fc00::/7
        || address.is_unicast_link_local() // fe80::/10
        || first & 0xffc0 == 0xfec0 // site-local (deprecated, still routed inside some networks)
        || (first == 0x2001 && second == 0x0db8); // documentation
    !special
}

/// The IPv4 address an IPv6 one leads to: mapped (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`,
/// deprecated), NAT64 (`64:ff9b::a.b.c.d`).
fn carried_v4(address: Ipv6Addr) -> Option<Ipv4Addr> {
    let segments = address.segments();
    let [.., a, b, c, d] = address.octets();
    let mapped_or_compatible = segments[..5].iter().all(|segment| *segment == 0) && matches!(segments[5], 0 | 0xffff);
    let nat64 = segments[0] == 0x64 && segments[1] == 0xff9b && segments[2..6].iter().all(|segment| *segment == 0);
    (mapped_or_compatible || nat64).then_some(Ipv4Addr::new(a, b, c, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_http_urls_pass() {
        for url in [
            "https://example.com/a.png",
            "http://upload.wikimedia.org/x.jpg?y=1",
            "https://8.8.8.8/a",
            "https://[2606:4700:4700::1111]/a",
            "https://user:secret@example.com:8443/a",
            "https://www.youtube.com/watch?v=abc",
            // Ends in the letters of a local domain, not in the domain.
            "https://cdn.weblocal/a.png",
            "https://shop.catalan/a.png",
        ] {
            assert_eq!(not_public(url), None, "{url}");
        }
    }

    #[test]
    fn private_loopback_and_link_local_addresses_are_not_public() {
        for url in [
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "http://127.0.0.1:8000/v1/models",
            "http://127.255.255.254/",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://172.31.255.255/",
            "http://192.168.0.10/",
            "http://100.64.0.1/",
            "http://0.0.0.0:6379/",
            "http://0.1.2.3/",
            "http://255.255.255.255/",
            "http://224.0.0.1/",
            "http://240.0.0.1/",
            "http://[::1]/",
            "http://[::]/",
            "http://[fd00:ec2::254]/", // the EC2 metadata service over IPv6
            "http://[fc00::1]/",
            "http://[fe80::1]/",
            "http://[fec0::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:a9fe:a9fe]/", // 169.254.169.254, mapped
            "http://[::10.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
        ] {
            assert_eq!(not_public(url), Some("names this machine or a private network"), "{url}");
        }
    }

    /// Browsers, curl and Python's socket library read these IPv4 forms as dotted quads; so does
    /// the URL parser the check uses, so none slips past as a "name".
    #[test]
    fn ipv4_written_in_decimal_hex_or_octal_is_read_as_its_address() {
        for url in [
            "http://2130706433/",      // 127.0.0.1
            "http://0x7f.1/",          // 127.0.0.1
            "http://0x7f000001/",      // 127.0.0.1
            "http://0177.0.0.1/",      // 127.0.0.1
            "http://127.1/",           // 127.0.0.1
            "http://2852039166/",      // 169.254.169.254
            "http://0xa9.0xfe.0xa9.0xfe/",
            "http://0251.0376.0251.0376/",
        ] {
            assert_eq!(not_public(url), Some("names this machine or a private network"), "{url}");
        }
        assert_eq!(not_public("http://134744072/"), None, "8.8.8.8 in decimal is public");
    }

    #[test]
    fn local_names_and_other_schemes_are_not_public() {
        for url in [
            "http://localhost:11434/",
            "http://LOCALHOST./",
            "http://api.localhost/",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://metadata/computeMetadata/v1/",
            "http://redis.default.svc.cluster.local:6379/",
            "http://router.home.arpa/",
            "http://nas.lan/",
        ] {
            assert_eq!(not_public(url), Some("names this machine or a private network"), "{url}");
        }
        for url in ["file:///etc/passwd", "gs://operator-backups/db.sql", "ftp://example.com/a", "s3://bucket/key"] {
            assert_eq!(not_public(url), Some("is not an http(s) URL"), "{url}");
        }
        assert_eq!(not_public("not a url"), Some("is not a URL"));
        assert_eq!(not_public("http://"), Some("is not a URL"));
    }

    #[test]
    fn each_policy_refuses_what_it_says() {
        let url = |url: &str| MediaReference::Url { field: "image_url.url", url: url.into() };
        let file = MediaReference::File { field: "file.file_id", id: "file-abc".into() };
        let refused = |files, urls, reference: &MediaReference| refusal("p", files, urls, reference);
        let (refuse, allow) = (ClientFileReferences::Refuse, ClientFileReferences::Allow);
        assert!(refused(refuse, ClientUrls::Allow, &file).is_some_and(|message| message.contains("file.file_id") && message.contains("client_file_references = \"refuse\"")));
        assert_eq!(refused(allow, ClientUrls::Refuse, &file), None);
        let private = url("http://10.0.0.1/a.png");
        let public = url("https://example.com/a.png");
        assert!(refused(allow, ClientUrls::PublicOnly, &private).is_some_and(|message| message.contains("image_url.url") && message.contains("public_only")));
        assert_eq!(refused(refuse, ClientUrls::PublicOnly, &public), None);
        assert!(refused(allow, ClientUrls::Refuse, &public).is_some_and(|message| message.contains("client_urls = \"refuse\"")));
        assert_eq!(refused(refuse, ClientUrls::Allow, &private), None);
        assert_eq!(refused(refuse, ClientUrls::Allow, &url("file:///etc/passwd")), None, "allow is allow");
    }
}
