//! SMS segments: how many messages a text costs once a carrier splits it.
//!
//! A text that fits the GSM 03.38 default alphabet (GSM-7) travels 160 characters to a
//! single message, 153 to each part of a concatenated one; the extension characters
//! (`{ } [ ] ~ \ | ^ €` and form feed) take two of those. Any other character (Chinese,
//! emoji, `ç`…) switches the whole text to UCS-2: 70 UTF-16 units alone, 67 per part. A
//! two-character sequence (an escape pair, a surrogate pair) is never cut across parts.

use serde::Serialize;

/// The GSM-7 basic character set (3GPP TS 23.038), one septet each.
const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\u{1b}ÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The GSM-7 extension table: an escape septet and the character, two septets each.
const GSM7_EXTENSION: &str = "\u{c}^{}\\[~]|€";

/// Which alphabet a text needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The GSM 03.38 default alphabet.
    Gsm7,
    /// UCS-2 (UTF-16 units).
    Ucs2,
}

impl Encoding {
    /// Units in a message that is not split, and in each part of one that is.
    pub fn limits(self) -> (usize, usize) {
        match self {
            Encoding::Gsm7 => (160, 153),
            Encoding::Ucs2 => (70, 67),
        }
    }
}

/// What a text costs as SMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Segments {
    pub encoding: Encoding,
    /// Septets (GSM-7) or UTF-16 units (UCS-2).
    pub units: usize,
    /// Messages it is sent as; an empty text is one.
    pub segments: usize,
}

/// The encoding `text` needs and how many segments it is sent as. Runs on every SMS send:
/// two passes over the text, no allocation.
pub fn segments(text: &str) -> Segments {
    let encoding = if text.chars().all(|c| gsm7_width(c).is_some()) {
        Encoding::Gsm7
    } else {
        Encoding::Ucs2
    };
    let width = |c: char| match encoding {
        Encoding::Gsm7 => gsm7_width(c).unwrap_or(1),
        Encoding::Ucs2 => c.len_utf16(),
    };
    let units: usize = text.chars().map(width).sum();
    let (single, part) = encoding.limits();
    if units <= single {
        return Segments {
            encoding,
            units,
            segments: 1,
        };
    }
    // Fill parts in order; a character that does not fit whole starts the next part.
    let mut count = 1;
    let mut used = 0;
    for w in text.chars().map(width) {
        if used + w > part {
            count += 1;
            used = 0;
        }
        used += w;
    }
    Segments {
        encoding,
        units,
        segments: count,
    }
}

/// Which ASCII characters a set holds: a table lookup instead of a scan of the set for the
/// characters most texts are made of. (UTF-8 encodes every non-ASCII character in bytes of
/// 0x80 and up, so the set's bytes below 0x80 are exactly its ASCII characters.)
const fn ascii_in(set: &str) -> [bool; 128] {
    let bytes = set.as_bytes();
    let mut table = [false; 128];
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] < 128 {
            table[bytes[i] as usize] = true;
        }
        i += 1;
    }
    table
}

static BASIC_ASCII: [bool; 128] = ascii_in(GSM7_BASIC);
static EXTENSION_ASCII: [bool; 128] = ascii_in(GSM7_EXTENSION);

/// Septets `c` takes in GSM-7, or `None` when GSM-7 cannot carry it. (The escape septet
/// itself is not a character a text may hold.)
fn gsm7_width(c: char) -> Option<usize> {
    if c == '\u{1b}' {
        return None;
    }
    if c.is_ascii() {
        let i = c as usize;
        return if BASIC_ASCII[i] {
            Some(1)
        } else if EXTENSION_ASCII[i] {
            Some(2)
        } else {
            None
        };
    }
    if GSM7_BASIC.contains(c) {
        Some(1)
    } else if GSM7_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ascii_tables_agree_with_the_character_sets() {
        for c in (0u8..128).map(char::from) {
            let scanned = if c != '\u{1b}' && GSM7_BASIC.contains(c) {
                Some(1)
            } else if GSM7_EXTENSION.contains(c) {
                Some(2)
            } else {
                None
            };
            assert_eq!(gsm7_width(c), scanned, "{c:?}");
        }
    }

    #[test]
    fn gsm7_fits_160_then_153_per_part() {
        assert_eq!(segments("").segments, 1);
        let s = segments(&"a".repeat(160));
        assert_eq!((s.encoding, s.units, s.segments), (Encoding::Gsm7, 160, 1));
        assert_eq!(segments(&"a".repeat(161)).segments, 2);
        assert_eq!(segments(&"a".repeat(306)).segments, 2);
        assert_eq!(segments(&"a".repeat(307)).segments, 3);
    }

    #[test]
    fn extension_characters_count_two_and_are_not_split() {
        let s = segments(&"€".repeat(80));
        assert_eq!((s.encoding, s.units, s.segments), (Encoding::Gsm7, 160, 1));
        assert_eq!(segments(&"€".repeat(81)).segments, 2);
        // 152 septets, then a two-septet `{` that would straddle parts 1 and 2.
        let text = format!("{}{{{}", "a".repeat(152), "a".repeat(10));
        let s = segments(&text);
        assert_eq!(s.units, 164);
        assert_eq!(s.segments, 2);
    }

    #[test]
    fn any_other_character_switches_to_ucs2() {
        let s = segments("生日快乐");
        assert_eq!((s.encoding, s.units, s.segments), (Encoding::Ucs2, 4, 1));
        assert_eq!(segments(&"生".repeat(70)).segments, 1);
        assert_eq!(segments(&"生".repeat(71)).segments, 2);
        assert_eq!(segments(&"生".repeat(134)).segments, 2);
        assert_eq!(segments(&"生".repeat(135)).segments, 3);
        // An emoji is two UTF-16 units and one character of GSM-7 text makes it all UCS-2.
        let s = segments(&format!("{}😀", "a".repeat(68)));
        assert_eq!((s.encoding, s.units, s.segments), (Encoding::Ucs2, 70, 1));
    }
}
