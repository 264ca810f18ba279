//! The System Overview page: one HTML file with its style and script inside, compiled into lbd
//! (no CDN, no external font or script: it works with no network beyond lbd).

use serde::Deserialize;
use subtle::ConstantTimeEq;

/// The page.
pub const HTML: &str = include_str!("page.html");

/// A button of the page: `{"service": ..., "real_server": ..., "action": "drain"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// The service's label.
    pub service: String,
    /// The real server's label.
    pub real_server: String,
    /// `drain`, `halt` or `online`.
    pub action: String,
}

/// Whether `offered` is the token, compared in constant time (no timing says how much of a
/// guess was right).
pub fn same_token(offered: &[u8], token: &[u8]) -> bool {
    offered.len() == token.len() && bool::from(offered.ct_eq(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_must_match_whole() {
        let token = b"0123456789abcdef0123";
        assert!(same_token(token, token));
        assert!(!same_token(b"0123456789abcdef012", token));
        assert!(!same_token(b"0123456789abcdef0124", token));
        assert!(!same_token(b"", token));
    }

    #[test]
    fn the_page_needs_nothing_from_elsewhere() {
        // No script, style, font or image from another origin.
        for foreign in ["http://", "https://", "//cdn", "@import"] {
            assert!(!HTML.contains(foreign), "the page loads {foreign}");
        }
        assert!(HTML.contains("/api/status") && HTML.contains("/api/history"));
    }
}
