//! `rollout ping [--hosts h1,h2] [--timeout 10s]`: the coordinator pings the
//! hosts over their agent streams, all at once, and reports each round trip
//! and the fan-out's wall time (see `ControlService.Ping`).

use std::io::Write;
use std::time::Duration;

use rollout_proto::pb;

use super::{CliError, Client, Connection, Output, json_out};

/// The `p`-th percentile (0 < p ≤ 1, nearest rank) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `rollout ping`: true when every host answered.
pub async fn ping(
    conn: &Connection,
    hosts: &[String],
    timeout: Duration,
    output: Output,
    out: &mut dyn Write,
) -> Result<bool, CliError> {
    if timeout.is_zero() {
        return Err(CliError::Invalid(
            "--timeout must be longer than 0, e.g. --timeout 10s".into(),
        ));
    }
    let client = Client::connect(conn).await?;
    // Answered after the slowest host or `timeout`: bounded by that.
    let limit = timeout + client.answer_timeout();
    let ping = async {
        client
            .long()
            .await?
            .ping(pb::PingRequest {
                hosts: hosts.to_vec(),
                timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
            })
            .await
            .map_err(|s| client.err(s))
    };
    let r = tokio::time::timeout(limit, ping)
        .await
        .map_err(|_| client.no_answer(limit))??
        .into_inner();
    let mut rtts: Vec<u64> = r.hosts.iter().filter(|h| h.ok).map(|h| h.rtt_us).collect();
    rtts.sort_unstable();
    let answered = rtts.len();
    let (p50, p99, max) = (
        percentile(&rtts, 0.50),
        percentile(&rtts, 0.99),
        rtts.last().copied(),
    );
    match output {
        Output::Json => json_out(
            out,
            &serde_json::json!({
                "pinged": r.hosts.len(),
                "answered": answered,
                "elapsed_us": r.elapsed_us,
                "rtt_p50_us": p50,
                "rtt_p99_us": p99,
                "rtt_max_us": max,
                "hosts": r.hosts.iter().map(|h| serde_json::json!({
                    "host": h.host, "ok": h.ok, "rtt_us": h.rtt_us, "error": h.error,
                })).collect::<Vec<_>>(),
            }),
        )?,
        Output::Table => {
            writeln!(out, "{:<24} {:<4} {:>10}  ERROR", "HOST", "OK", "RTT-MS")?;
            for h in &r.hosts {
                writeln!(
                    out,
                    "{:<24} {:<4} {:>10}  {}",
                    h.host,
                    if h.ok { "yes" } else { "no" },
                    if h.ok {
                        format!("{:.3}", ms(h.rtt_us))
                    } else {
                        "-".into()
                    },
                    h.error
                )?;
            }
            let stats = match (p50, p99, max) {
                (Some(a), Some(b), Some(c)) => format!(
                    "; round trip p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                    ms(a),
                    ms(b),
                    ms(c)
                ),
                _ => String::new(),
            };
            writeln!(
                out,
                "{answered} of {} hosts answered in {:.3} ms{stats}",
                r.hosts.len(),
                ms(r.elapsed_us)
            )?;
        }
    }
    Ok(answered == r.hosts.len())
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
