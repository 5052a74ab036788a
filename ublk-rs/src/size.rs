//! Sizes as people write them, the one syntax of the `ublk` command and of
//! this crate's examples: the [`parse-size`](https://docs.rs/parse-size)
//! crate with binary units, refusing fractions of a byte.

use std::fmt;

/// The size syntax in one sentence, for help texts.
pub const SIZE_SYNTAX: &str = "a number of bytes, or a number with a unit: \
K, M, G, T (or KiB, MiB, GiB, TiB; KB, MB, GB, TB; any case) are powers of 1024; \
a decimal fraction is taken where it makes whole bytes (1.5G, 0.5K), not otherwise (0.1K)";

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeError {
    input: String,
    reason: &'static str,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid size {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for SizeError {}

const CONFIG: parse_size::Config = parse_size::Config::new().with_binary();

/// Parses a size ([`SIZE_SYNTAX`]): `4096`, `512K`, `1.5G`, `1GiB`, `2 TB`.
///
/// ```
/// assert_eq!(ublk::parse_size("1.5G"), Ok(3 << 29));
/// assert_eq!(ublk::parse_size("1GiB"), Ok(1 << 30));
/// assert!(ublk::parse_size("0.1K").is_err()); // 102.4 bytes
/// ```
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError {
        input: s.to_owned(),
        reason,
    };
    let bytes = CONFIG.parse_size(s).map_err(|e| match e {
        parse_size::Error::Empty => err("no number"),
        parse_size::Error::PosOverflow => err("too large (more than 2^64-1 bytes)"),
        _ => err("not a number with an optional unit (K, M, G, T: powers of 1024)"),
    })?;
    if !whole_bytes(s) {
        return Err(err("not a whole number of bytes"));
    }
    Ok(bytes)
}

/// Whether `s` (which `parse-size` accepted) is a whole number of bytes
/// rather than one it rounded: number × unit without a fraction left.
fn whole_bytes(s: &str) -> bool {
    let t: Vec<u8> = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'_')
        .collect();
    // The unit, as parse-size reads it from the end: [prefix][i][B].
    let mut num = t.as_slice();
    if let [init @ .., b'b' | b'B'] = num {
        num = init;
    }
    let binary = matches!(num, [.., b'i' | b'I']);
    if binary {
        num = &num[..num.len() - 1];
    }
    let mut unit = 1u128;
    if let [init @ .., p] = num {
        let shift = match p.to_ascii_uppercase() {
            b'K' => Some(10),
            b'M' => Some(20),
            b'G' => Some(30),
            b'T' => Some(40),
            b'P' => Some(50),
            b'E' => Some(60),
            _ => None,
        };
        if let Some(shift) = shift {
            unit = 1 << shift;
            num = init;
        }
    }
    // The number: digits [. digits] [e [+-] digits].
    let (mantissa, exp) = match num.iter().position(|b| matches!(b, b'e' | b'E')) {
        Some(i) => (&num[..i], &num[i + 1..]),
        None => (num, &b""[..]),
    };
    let Ok(mut exp) = std::str::from_utf8(exp).map_or(Err(()), |e| {
        if e.is_empty() {
            Ok(0i64)
        } else {
            e.parse::<i64>().map_err(drop)
        }
    }) else {
        return false;
    };
    let (int, frac) = match mantissa.iter().position(|&b| b == b'.') {
        Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
        None => (mantissa, &b""[..]),
    };
    let mut digits: Vec<u8> = int.iter().chain(frac).copied().collect();
    exp -= frac.len() as i64;
    while digits.last() == Some(&b'0') && exp < 0 {
        digits.pop();
        exp += 1;
    }
    if exp >= 0 {
        return true;
    }
    let digits = std::str::from_utf8(&digits).unwrap_or("x");
    let (Ok(m), Ok(e)) = (
        digits.trim_start_matches('0').parse::<u128>(),
        u32::try_from(-exp),
    ) else {
        // Zero, or more digits than can be checked: zero is whole, the
        // rest is taken as a fraction.
        return digits.bytes().all(|b| b == b'0');
    };
    match (m.checked_mul(unit), 10u128.checked_pow(e)) {
        (Some(v), Some(p)) => v % p == 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_binary_and_fractions_must_make_whole_bytes() {
        for (s, want) in [
            ("4096", 4096),
            ("512K", 512 << 10),
            ("512k", 512 << 10),
            ("1M", 1 << 20),
            ("250G", 250 << 30),
            ("1T", 1 << 40),
            ("1GiB", 1 << 30),
            ("1gib", 1 << 30),
            ("1GB", 1 << 30),
            ("2 MiB", 2 << 20),
            ("1.5G", 3 << 29),
            ("0.5K", 512),
            ("1.25K", 1280),
            ("1.000K", 1024),
            ("100B", 100),
            ("1e3", 1000),
            ("0", 0),
            ("0.0", 0),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
        let bad = |s: &str| parse_size(s).unwrap_err().to_string();
        assert_eq!(
            bad("garbage"),
            "invalid size \"garbage\": not a number with an optional unit (K, M, G, T: powers of 1024)"
        );
        assert_eq!(
            bad("0.1K"),
            "invalid size \"0.1K\": not a whole number of bytes"
        );
        assert_eq!(
            bad("1.5"),
            "invalid size \"1.5\": not a whole number of bytes"
        );
        assert_eq!(
            bad("1e-1"),
            "invalid size \"1e-1\": not a whole number of bytes"
        );
        assert_eq!(bad(""), "invalid size \"\": no number");
        assert_eq!(
            bad("99999999999T"),
            "invalid size \"99999999999T\": too large (more than 2^64-1 bytes)"
        );
        assert!(bad("-1").contains("not a number"));
        assert!(bad("1Q").contains("not a number"));
        assert!(bad("1.2.3").contains("not a number"));
    }
}
