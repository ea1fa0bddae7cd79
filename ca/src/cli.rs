//! The `hybridge-ca` command line: argument types (clap derive) and one function per
//! subcommand, each a thin layer over [`crate::authority`] adding operator context.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::authority::{CertificateAuthority, InitOptions, KeyType, RevocationReason};
use crate::files::{self, PUBLIC_MODE};
use crate::registry::IssuedRecord;
use crate::spiffe::SpiffeId;
use crate::{duration, inspect};

/// hybridge certificate authority: issue, revoke and inspect node, service and administrator
/// certificates.
#[derive(Debug, Parser)]
#[command(name = "hybridge-ca", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new self-signed CA in DIR (refuses to overwrite an existing one).
    Init(InitArgs),
    /// Issue a node, service or administrator certificate.
    #[command(subcommand)]
    Issue(IssueCommand),
    /// List every certificate this CA issued.
    List {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a certificate by serial, or every still-valid certificate of a SPIFFE id.
    Revoke(RevokeArgs),
    /// Write a signed CRL listing every revoked certificate.
    Crl {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Where to write the CRL (PEM).
        #[arg(long)]
        out: PathBuf,
        /// How long the CRL claims to be current (nextUpdate).
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        next_update: Duration,
    },
    /// Show subject, SANs, validity, issuer, serial and fingerprint of a certificate file.
    Inspect {
        /// Certificate file (PEM chain or DER); the first certificate is shown.
        file: PathBuf,
        /// CA directory: also report whether the certificate is revoked.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Arguments of `init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// CA directory (created 0700 if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Trust domain, e.g. corp.example ([a-z0-9._-]+).
    #[arg(long)]
    pub trust_domain: String,
    /// CA certificate lifetime.
    #[arg(long, default_value = "10y", value_parser = parse_duration)]
    pub validity: Duration,
    /// CA key algorithm.
    #[arg(long, value_enum, default_value_t = KeyTypeArg::EcdsaP256)]
    pub key_type: KeyTypeArg,
}

/// `--key-type` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KeyTypeArg {
    /// ECDSA P-256.
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

/// `issue` subcommands.
#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// Certificate for a bridge node: spiffe://TD/site/SITE/node/NAME.
    Node {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Site of the node.
        #[arg(long)]
        site: String,
        /// Node name.
        #[arg(long)]
        name: String,
        /// DNS SAN (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP SAN (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Certificate lifetime.
        #[arg(long, default_value = "90d", value_parser = parse_duration)]
        validity: Duration,
        /// Output prefix: writes PREFIX.pem (chain) and PREFIX.key (0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Certificate for a service: spiffe://TD/svc/NAME.
    Service {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Service name.
        #[arg(long)]
        name: String,
        /// DNS SAN (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// Certificate lifetime.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        validity: Duration,
        /// Output prefix: writes PREFIX.pem (chain) and PREFIX.key (0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Certificate for an administrator: spiffe://TD/admin/NAME (clientAuth only), for
    /// `hybridge acl --admin https://NODE:PORT --cert PREFIX.pem --key PREFIX.key --ca ca.pem`
    /// against a node's remote admin listener (`[admin.remote]`).
    Admin {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// Administrator name, recorded in every audit log entry of the changes made with it.
        #[arg(long)]
        name: String,
        /// Certificate lifetime.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        validity: Duration,
        /// Output prefix: writes PREFIX.pem (chain) and PREFIX.key (0600).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Arguments of `revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// CA directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Serial number (hex) to revoke.
    #[arg(required_unless_present = "spiffe", conflicts_with = "spiffe")]
    pub serial: Option<String>,
    /// Revoke every still-valid certificate of this SPIFFE id.
    #[arg(long)]
    pub spiffe: Option<String>,
    /// Reason: unspecified, key-compromise, ca-compromise, affiliation-changed,
    /// superseded, cessation-of-operation, privilege-withdrawn.
    #[arg(long, default_value = "unspecified")]
    pub reason: RevocationReason,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    duration::parse(s).map_err(|e| e.to_string())
}

/// Renders a clap parse error as one line (drops usage and tips).
pub fn clap_error_line(rendered: &str) -> String {
    let mut parts = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() || line.starts_with("tip:") {
            continue;
        }
        parts.push(line);
    }
    parts.join(" ")
}

/// Renders an error chain on one line: `outer: inner: cause`.
pub fn error_line(err: &anyhow::Error) -> String {
    format!("{err:#}").replace('\n', " ")
}

fn open(dir: &Path) -> Result<CertificateAuthority> {
    CertificateAuthority::open(dir).with_context(|| format!("opening CA in {}", dir.display()))
}

fn time_text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Runs a parsed command, printing results to stdout.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(args) => {
            let opts = InitOptions {
                validity: args.validity,
                key_type: match args.key_type {
                    KeyTypeArg::EcdsaP256 => KeyType::EcdsaP256,
                    KeyTypeArg::Ed25519 => KeyType::Ed25519,
                },
            };
            let ca = CertificateAuthority::init(&args.dir, &args.trust_domain, opts)
                .with_context(|| format!("initialising CA in {}", args.dir.display()))?;
            println!(
                "created CA for trust domain {} in {} (ca.pem, ca.key, ca.redb), valid until {}",
                ca.trust_domain(),
                args.dir.display(),
                time_text(ca.not_after())
            );
        }
        Command::Issue(IssueCommand::Node {
            dir,
            site,
            name,
            dns,
            ip,
            validity,
            out,
        }) => {
            let ca = open(&dir)?;
            let issued = ca
                .issue_node(&site, &name, &dns, &ip, validity)
                .context("issuing node certificate")?;
            report_issued(&issued, &out)?;
        }
        Command::Issue(IssueCommand::Service {
            dir,
            name,
            dns,
            validity,
            out,
        }) => {
            let ca = open(&dir)?;
            let issued = ca
                .issue_service(&name, &dns, validity)
                .context("issuing service certificate")?;
            report_issued(&issued, &out)?;
        }
        Command::Issue(IssueCommand::Admin {
            dir,
            name,
            validity,
            out,
        }) => {
            let ca = open(&dir)?;
            let issued = ca
                .issue_admin(&name, validity)
                .context("issuing administrator certificate")?;
            report_issued(&issued, &out)?;
        }
        Command::List { dir, json } => {
            let ca = open(&dir)?;
            let records = ca.list().context("listing certificates")?;
            if json {
                let rows: Vec<_> = records.iter().map(record_json).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<32}  {:<7}  {:<7}  {:<25}  SPIFFE ID",
                    "SERIAL", "KIND", "STATUS", "NOT AFTER"
                );
                for r in &records {
                    println!(
                        "{:<32}  {:<7}  {:<7}  {:<25}  {}",
                        r.serial_hex,
                        r.kind.as_str(),
                        r.status().as_str(),
                        time_text(r.not_after),
                        r.spiffe_id
                    );
                }
            }
        }
        Command::Revoke(args) => {
            let ca = open(&args.dir)?;
            match (args.serial, args.spiffe) {
                (Some(serial), _) => {
                    ca.revoke_serial(&serial, args.reason)
                        .with_context(|| format!("revoking serial {serial}"))?;
                    println!("revoked {serial} ({})", args.reason);
                }
                (None, Some(uri)) => {
                    let id = SpiffeId::parse(&uri).context("--spiffe")?;
                    let n = ca
                        .revoke_spiffe(&id, args.reason)
                        .with_context(|| format!("revoking {id}"))?;
                    if n == 0 {
                        bail!(
                            "revoking {id}: no still-valid certificate for it in {}",
                            args.dir.display()
                        );
                    }
                    println!("revoked {n} certificate(s) of {id} ({})", args.reason);
                }
                (None, None) => bail!("give a SERIAL or --spiffe ID"),
            }
            println!("run `hybridge-ca crl` and distribute the CRL so nodes reject it");
        }
        Command::Crl {
            dir,
            out,
            next_update,
        } => {
            let ca = open(&dir)?;
            let pem = ca
                .crl_pem_valid_for(next_update)
                .context("generating CRL")?;
            files::write_atomic(&out, pem.as_bytes(), PUBLIC_MODE)
                .with_context(|| format!("writing CRL {}", out.display()))?;
            let revoked = ca.list()?.iter().filter(|r| r.revocation.is_some()).count();
            println!(
                "wrote CRL with {revoked} revoked certificate(s) to {}",
                out.display()
            );
        }
        Command::Inspect { file, dir } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("reading certificate {}", file.display()))?;
            let summary = inspect::summarize(&bytes)
                .with_context(|| format!("inspecting {}", file.display()))?;
            println!("{summary}");
            if let Some(dir) = dir {
                let ca = open(&dir)?;
                let line = match ca.find_serial(&summary.serial_hex)? {
                    None => "not issued by this CA".to_string(),
                    Some(IssuedRecord {
                        revocation: Some(rev),
                        ..
                    }) => format!("REVOKED at {} ({})", time_text(rev.at), rev.reason),
                    Some(record) => record.status().as_str().to_string(),
                };
                println!("status:      {line}");
            }
        }
    }
    Ok(())
}

fn report_issued(issued: &crate::authority::IssuedCertificate, out: &Path) -> Result<()> {
    let (pem, key) = issued
        .write(out)
        .with_context(|| format!("writing certificate for {}", issued.spiffe_id))?;
    println!(
        "issued {} serial {} valid until {}: {} {}",
        issued.spiffe_id,
        issued.serial_hex,
        time_text(issued.not_after),
        pem.display(),
        key.display()
    );
    Ok(())
}

fn record_json(r: &IssuedRecord) -> serde_json::Value {
    serde_json::json!({
        "serial": r.serial_hex,
        "subject": r.subject,
        "spiffe_id": r.spiffe_id,
        "kind": r.kind.as_str(),
        "not_before": time_text(r.not_before),
        "not_after": time_text(r.not_after),
        "status": r.status().as_str(),
        "revocation_reason": r.revocation.as_ref().map(|x| x.reason.as_str()),
        "revoked_at": r.revocation.as_ref().map(|x| time_text(x.at)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn clap_errors_become_one_line() {
        let err = Cli::try_parse_from(["hybridge-ca", "list"]).unwrap_err();
        let line = clap_error_line(&err.render().to_string());
        assert!(!line.contains('\n'));
        assert!(line.starts_with("error: "), "{line}");
        assert!(line.contains("--dir"), "{line}");
    }
}
