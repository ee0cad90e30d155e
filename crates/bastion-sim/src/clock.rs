//! Wall-clock helpers: Unix milliseconds and the ISO 8601 form used in `channel_closed`
//! and accepted by the DescribeSessions date filters.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (never 0, which a ClientMessage CreatedDate must not
/// be).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
        .max(1)
}

/// Whole seconds since the Unix epoch (SigV4 dates).
pub fn unix_secs() -> i64 {
    i64::try_from(unix_ms() / 1000).unwrap_or(i64::MAX)
}

/// Epoch seconds with a fraction: the AWS JSON 1.1 timestamp format.
pub fn epoch_seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (`civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `2024-01-01T00:00:00.000Z` for Unix milliseconds.
pub fn iso8601(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60,
        ms % 1000
    )
}

/// Parses `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ` or `YYYY-MM-DDTHH:MM:SS.fffZ` (UTC) into
/// Unix milliseconds.
pub fn parse_iso8601(s: &str) -> Option<u64> {
    let s = s.trim();
    let (date, time) = match s.split_once(['T', 't', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut ms_of_day = 0u64;
    if let Some(t) = time {
        let t = t.strip_suffix(['Z', 'z']).unwrap_or(t);
        let (hms, frac) = match t.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (t, None),
        };
        let mut f = hms.split(':');
        let h: u64 = f.next()?.parse().ok()?;
        let mi: u64 = f.next()?.parse().ok()?;
        let se: u64 = f.next().map_or(Some(0), |x| x.parse().ok())?;
        if f.next().is_some() || h > 23 || mi > 59 || se > 60 {
            return None;
        }
        let frac_ms = match frac {
            Some(fr) if !fr.is_empty() && fr.bytes().all(|b| b.is_ascii_digit()) => {
                let mut digits: String = fr.chars().take(3).collect();
                while digits.len() < 3 {
                    digits.push('0');
                }
                digits.parse().ok()?
            }
            Some(_) => return None,
            None => 0,
        };
        ms_of_day = ((h * 60 + mi) * 60 + se) * 1000 + frac_ms;
    }
    let days = days_from_civil(y, m, d);
    u64::try_from(days * 86_400_000).ok().map(|b| b + ms_of_day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_round_trip() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_704_067_200_000), "2024-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_503_434_274_948), "2017-08-22T20:37:54.948Z");
        for ms in [0, 1_503_434_274_948, 1_709_251_199_999, 4_102_444_800_123] {
            assert_eq!(parse_iso8601(&iso8601(ms)), Some(ms));
        }
        assert_eq!(parse_iso8601("2024-08-29"), Some(1_724_889_600_000));
        assert_eq!(
            parse_iso8601("2024-08-29T00:00:00Z"),
            Some(1_724_889_600_000)
        );
        assert_eq!(parse_iso8601("2024-13-01"), None);
        assert_eq!(parse_iso8601("yesterday"), None);
    }
}
