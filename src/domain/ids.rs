//! Identifier rules shared by usage ids and subscription ids.

/// Longest id SPEC allows, in characters.
pub const MAX_ID_CHARS: usize = 50;

/// Prefix reserved for ids the worker derives from a message's coordinates.
pub const DERIVED_ID_PREFIX: &str = "msg_";

/// Characters that render as nothing (zero-width, joiners, direction
/// marks and embeddings, variation selectors, tags) and so make two ids look
/// alike.
fn is_zero_width(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2069}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{E0000}'..='\u{E007F}'
            | '\u{E0100}'..='\u{E01EF}'
    )
}

/// Checks the id rules common to `id` and `subscriptionId`; the error is the
/// human-readable message for the outcome.
pub fn check_id(value: &str) -> Result<(), String> {
    let chars = value.chars().count();
    if chars == 0 {
        return Err("must not be empty".into());
    }
    if chars > MAX_ID_CHARS {
        return Err(format!("must be at most {MAX_ID_CHARS} characters, got {chars}"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || is_zero_width(*c))
    {
        return Err(format!(
            "must not contain whitespace, control or zero-width characters (found U+{:04X})",
            c as u32
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        assert!(check_id("usg_1").is_ok());
        assert!(check_id(&"a".repeat(50)).is_ok());
        assert!(check_id("ü_ok-ids.too").is_ok());
    }

    #[test]
    fn rejects_51_characters() {
        assert!(check_id(&"a".repeat(51)).unwrap_err().contains("51"));
    }

    #[test]
    fn counts_characters_not_bytes() {
        assert!(check_id(&"é".repeat(50)).is_ok());
    }

    #[test]
    fn rejects_whitespace_control_and_zero_width() {
        for bad in [
            "a b",
            "a\tb",
            "a\nb",
            "a\u{0}b",
            "a\u{200B}b",
            "\u{FEFF}a",
            "a\u{00A0}b",
            "",
        ] {
            assert!(check_id(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
