//! Rates and the weekly timetable (`bandwidth`, `bandwidth_schedule`): parsing, and which rate
//! holds at a given local weekday and minute. Pure.

use super::bucket::Rate;

/// One `bandwidth_schedule` entry: on `days`, from `from` to `to` (minutes since midnight;
/// `to` may be before `from`: the window runs past midnight into the next day), `rate`.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Monday = 0 .. Sunday = 6.
    pub days: [bool; 7],
    pub from: u16,
    pub to: u16,
    pub rate: Rate,
}

/// The whole rule: the first window that holds, else the default.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub default: Rate,
    pub windows: Vec<Window>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Schedule {
    /// The rate at `weekday` (Monday = 0) and `minute` since local midnight.
    pub fn rate_at(&self, weekday: usize, minute: u16) -> Rate {
        let yesterday = (weekday + 6) % 7;
        self.windows
            .iter()
            .find(|w| {
                if w.from < w.to {
                    w.days[weekday] && (w.from..w.to).contains(&minute)
                } else {
                    // Overnight (or the whole day when from == to == 0).
                    (w.days[weekday] && minute >= w.from) || (w.days[yesterday] && minute < w.to)
                }
            })
            .map_or(self.default, |w| w.rate)
    }
}

/// A rate: `off` (no limit), `0` (paused), or a number with a unit: bits per second (`bit`,
/// `kbit`, `Mbit`, `Gbit`; decimal) or bytes per second (`B`, `KB`, `MB`, `GB` decimal;
/// `KiB`, `MiB`, `GiB` binary); an optional `/s`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(Rate::Unlimited);
    }
    let t = t.strip_suffix("/s").unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("not a rate: {s:?} (e.g. \"40Mbit\", \"5MB\", \"off\", \"0\")"))?;
    let per_unit = match unit.trim() {
        "" if n == 0.0 => 0.0,
        "bit" | "bps" => 1.0 / 8.0,
        "kbit" | "Kbit" | "kbps" => 1e3 / 8.0,
        "Mbit" | "mbit" | "Mbps" => 1e6 / 8.0,
        "Gbit" | "gbit" | "Gbps" => 1e9 / 8.0,
        "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "" => {
            return Err(format!(
                "{s:?} has no unit: write e.g. \"40Mbit\" (bits per second) or \"5MB\" (bytes per second)"
            ))
        }
        u => return Err(format!("unknown unit {u:?} in {s:?} (bit, kbit, Mbit, Gbit, B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    let bytes = n * per_unit;
    if !bytes.is_finite() || !(0.0..=1e12).contains(&bytes) {
        return Err(format!("{s:?} is out of range"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(Rate::BytesPerSec(bytes.round() as u64))
}

/// `Mon-Fri`, `Sat-Sun`, `Mon,Wed,Fri`, `Tue`, or `*` (every day).
pub fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    let t = s.trim();
    if t == "*" || t.eq_ignore_ascii_case("all") {
        return Ok([true; 7]);
    }
    let idx = |d: &str| {
        DAYS.iter()
            .position(|x| x.eq_ignore_ascii_case(d.trim()))
            .ok_or_else(|| {
                format!(
                    "unknown day {:?} in {s:?} (Mon, Tue, Wed, Thu, Fri, Sat, Sun)",
                    d.trim()
                )
            })
    };
    for part in t.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (idx(a)?, idx(b)?);
                let mut i = a;
                loop {
                    days[i] = true;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => days[idx(part)?] = true,
        }
    }
    Ok(days)
}

/// `HH:MM` (00:00 to 24:00) as minutes since midnight.
pub fn parse_clock(s: &str) -> Result<u16, String> {
    let err = || format!("not a time of day: {s:?} (HH:MM, e.g. \"07:00\")");
    let (h, m) = s.trim().split_once(':').ok_or_else(err)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
    if m >= 60 || h > 24 || (h == 24 && m > 0) {
        return Err(err());
    }
    Ok(h * 60 + m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_in_bits_and_bytes() {
        assert_eq!(parse_rate("40Mbit"), Ok(Rate::BytesPerSec(5_000_000)));
        assert_eq!(parse_rate("10Mbit/s"), Ok(Rate::BytesPerSec(1_250_000)));
        assert_eq!(parse_rate("5MB"), Ok(Rate::BytesPerSec(5_000_000)));
        assert_eq!(parse_rate("2MiB"), Ok(Rate::BytesPerSec(2_097_152)));
        assert_eq!(parse_rate("off"), Ok(Rate::Unlimited));
        assert_eq!(parse_rate("0"), Ok(Rate::BytesPerSec(0)));
        assert!(parse_rate("40").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("40Mbyte").is_err());
    }

    /// The example: weekday clinic hours limited, weekends unlimited, otherwise the
    /// default; an overnight window runs into the next day.
    #[test]
    fn the_timetable_picks_the_first_window_that_holds() {
        let s = Schedule {
            default: Rate::BytesPerSec(5_000_000),
            windows: vec![
                Window {
                    days: parse_days("Mon-Fri").unwrap(),
                    from: parse_clock("07:00").unwrap(),
                    to: parse_clock("19:00").unwrap(),
                    rate: Rate::BytesPerSec(1_250_000),
                },
                Window {
                    days: parse_days("Sat-Sun").unwrap(),
                    from: 0,
                    to: parse_clock("24:00").unwrap(),
                    rate: Rate::Unlimited,
                },
                Window {
                    days: parse_days("Fri").unwrap(),
                    from: parse_clock("22:00").unwrap(),
                    to: parse_clock("02:00").unwrap(),
                    rate: Rate::BytesPerSec(0),
                },
            ],
        };
        assert_eq!(s.rate_at(0, 7 * 60), Rate::BytesPerSec(1_250_000)); // Mon 07:00
        assert_eq!(s.rate_at(0, 6 * 60 + 59), Rate::BytesPerSec(5_000_000)); // Mon 06:59
        assert_eq!(s.rate_at(2, 19 * 60), Rate::BytesPerSec(5_000_000)); // Wed 19:00
        assert_eq!(s.rate_at(5, 12 * 60), Rate::Unlimited); // Sat
        assert_eq!(s.rate_at(4, 23 * 60), Rate::BytesPerSec(0)); // Fri 23:00
        assert_eq!(
            s.rate_at(5, 60),
            Rate::Unlimited,
            "Sat 01:00: the weekend window is first"
        );
        assert_eq!(
            parse_days("Fri-Mon").unwrap(),
            [true, false, false, false, true, true, true]
        );
        assert!(parse_days("Mon-Funday").is_err());
        assert!(parse_clock("25:00").is_err());
    }
}
