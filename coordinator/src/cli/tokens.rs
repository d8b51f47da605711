//! `rollout token create` and `rollout hosts remove`: admitting hosts with
//! single-use join tokens and revoking them.

use std::io::Write;
use std::time::Duration;

use rollout_proto::pb;

use super::{CliError, Client, Connection, Output, json_out, ms_to_time};

/// `rollout token ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCmd {
    /// Create a single-use join token for `rollout-agent join`; prints it
    /// (the coordinator keeps only its sha256). Needs `[tls] ca_key` on the
    /// coordinator.
    Create {
        /// How long the token can be used (1s to 7d), e.g. 10m.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// A label the joining host gets, key=value (repeatable).
        #[arg(long = "label", value_parser = crate::join::parse_label)]
        labels: Vec<(String, String)>,
        /// Only admit this host name.
        #[arg(long)]
        host: Option<String>,
    },
}

/// `rollout hosts ...` (without a subcommand: the hosts table).
#[derive(Debug, clap::Subcommand)]
pub enum HostsCmd {
    /// Remove (revoke) a host: its certificates are refused from now on, its
    /// connection is closed and it leaves `rollout hosts`. It may join again
    /// with a new token.
    Remove {
        /// Host name.
        host: String,
    },
}

/// The coordinator's own refusals (bad input, joining off) verbatim; the
/// rest (transport, certificates) as every other command reports them.
fn refused(client: &Client, s: tonic::Status) -> CliError {
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            CliError::Refused(s.message().to_string())
        }
        _ => client.err(s),
    }
}

/// Runs a `rollout token` command.
pub async fn token(
    conn: &Connection,
    cmd: TokenCmd,
    output: Output,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let TokenCmd::Create { ttl, labels, host } = cmd;
    let mut client = Client::connect(conn).await?;
    let r = client
        .inner
        .create_token(pb::CreateTokenRequest {
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            labels: labels.iter().cloned().collect(),
            host: host.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| refused(&client, s))?
        .into_inner();
    match output {
        Output::Json => json_out(
            out,
            &serde_json::json!({
                "token": r.token,
                "expires_at_ms": r.expires_at_ms,
                "labels": labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                "host": host,
            }),
        ),
        Output::Table => {
            // The token alone on stdout (`TOKEN=$(rollout token create)`);
            // how to use it on stderr.
            writeln!(out, "{}", r.token)?;
            let name = host.as_deref().unwrap_or("NAME");
            eprintln!(
                "single use, expires at {}; on the new host run:\n  rollout-agent join --coordinator {} --token {} --ca ca.pem --host {name} --dir /etc/rollout --config /etc/rollout/agent.toml",
                ms_to_time(r.expires_at_ms),
                conn.url,
                r.token
            );
            Ok(())
        }
    }
}

/// Runs a `rollout hosts` subcommand.
pub async fn hosts(
    conn: &Connection,
    cmd: HostsCmd,
    output: Output,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let HostsCmd::Remove { host } = cmd;
    let mut client = Client::connect(conn).await?;
    let r = client
        .inner
        .remove_host(pb::RemoveHostRequest { host })
        .await
        .map_err(|s| refused(&client, s))?
        .into_inner();
    match output {
        Output::Json => json_out(
            out,
            &serde_json::json!({
                "host": r.host, "was_known": r.was_known, "was_connected": r.was_connected,
                "removed_at_ms": r.removed_at_ms,
            }),
        ),
        Output::Table => {
            writeln!(
                out,
                "removed host {}{}: its certificates are refused from now on; join it again with a new token (`rollout token create`)",
                r.host,
                if r.was_connected {
                    " (its connection was closed)"
                } else {
                    ""
                }
            )?;
            if !r.was_known {
                eprintln!(
                    "note: the coordinator did not know a host {:?} (typo?); the name is revoked all the same",
                    r.host
                );
            }
            Ok(())
        }
    }
}
