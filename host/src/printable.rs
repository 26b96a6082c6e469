//! Text from a handler or a sender, made safe to print in a log line.

use std::borrow::Cow;

/// The Unicode bidirectional formatting characters (marks, embeddings,
/// overrides, isolates): invisible, and they reorder what follows, so
/// `urn:\u{202e}gnp.exe` displays as `urn:exe.png`.
pub fn is_bidi_formatting(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Handler-supplied text made safe for one log line, in every log format:
/// line breaks (`\n`, `\r`, U+2028, U+2029), tabs, ESC and every other C0 /
/// C1 control character, and the bidirectional overrides are written as
/// escapes (`\n`, `\r`, `\t`, `\u{1b}`), so a handler cannot forge log
/// lines or terminal sequences in `--log-format text`. JSON output escapes
/// again, harmlessly: one path for both. Backslashes are kept as they are.
pub fn printable(text: &str) -> Cow<'_, str> {
    fn needs_escape(c: char) -> bool {
        c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') || is_bidi_formatting(c)
    }
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn printable_escapes_what_could_forge_a_log_line() {
        assert_eq!(printable("plain text, \\ and ünïcode"), "plain text, \\ and ünïcode");
        assert!(matches!(printable("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(
            printable("a\nINFO forged\r\tb\u{1b}[31mc\u{7f}\u{85}d\u{2028}e\u{2029}f\u{202e}g\0"),
            "a\\nINFO forged\\r\\tb\\u{1b}[31mc\\u{7f}\\u{85}d\\u{2028}e\\u{2029}f\\u{202e}g\\u{0}"
        );
        let escaped = printable("x\ny\u{b}z\u{9b}");
        assert!(!escaped.chars().any(|c| c.is_control()), "{escaped}");
    }
}
