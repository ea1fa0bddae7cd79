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
    pub(crate) command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create a new self-signed CA in DIR (refuses to overwrite an existing one).
    Init(InitArgs),
    /// Issue a node, service or administrator certificate.
    #[command(subcommand)]
    Issue(IssueCommand),
    /// List every certificate this CA issued.
    List {
        /// CA directory.
        #[arg(long, env = CA_DIR_ENV)]
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
        #[arg(long, env = CA_DIR_ENV)]
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
        #[arg(long, env = CA_DIR_ENV)]
        dir: Option<PathBuf>,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script for hybridge-ca to stdout.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages for hybridge-ca and each of its subcommands into DIR.
    Man {
        /// Folder to write hybridge-ca.1, hybridge-ca-issue.1, ... into (created if missing).
        dir: PathBuf,
    },
}

/// Arguments of `init`.
#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// CA directory (created 0700 if missing).
    #[arg(long, env = CA_DIR_ENV)]
    pub(crate) dir: PathBuf,
    /// Trust domain, e.g. corp.example ([a-z0-9._-]+).
    #[arg(long)]
    pub(crate) trust_domain: String,
    /// CA certificate lifetime.
    #[arg(long, default_value = "10y", value_parser = parse_duration)]
    pub(crate) validity: Duration,
    /// CA key algorithm.
    #[arg(long, value_enum, default_value_t = KeyTypeArg::EcdsaP256)]
    pub(crate) key_type: KeyTypeArg,
}

/// `--key-type` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum KeyTypeArg {
    /// ECDSA P-256.
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

/// `issue` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum IssueCommand {
    /// Certificate for a bridge node: spiffe://TD/site/SITE/node/NAME.
    Node {
        /// CA directory.
        #[arg(long, env = CA_DIR_ENV)]
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
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// Certificate for a service: spiffe://TD/svc/NAME.
    Service {
        /// CA directory.
        #[arg(long, env = CA_DIR_ENV)]
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
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// Certificate for an administrator: spiffe://TD/admin/NAME (clientAuth only).
    ///
    /// For `hybridge acl --admin https://NODE:PORT --cert PREFIX.pem --key PREFIX.key --ca
    /// ca.pem` against a node's remote admin listener (`[admin.remote]`).
    Admin {
        /// CA directory.
        #[arg(long, env = CA_DIR_ENV)]
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
        /// Print JSON instead of a line.
        #[arg(long)]
        json: bool,
    },
}

/// Arguments of `revoke`.
#[derive(Debug, Args)]
pub(crate) struct RevokeArgs {
    /// CA directory.
    #[arg(long, env = CA_DIR_ENV)]
    pub(crate) dir: PathBuf,
    /// Serial number (hex) to revoke.
    #[arg(required_unless_present = "spiffe", conflicts_with = "spiffe")]
    pub(crate) serial: Option<String>,
    /// Revoke every still-valid certificate of this SPIFFE id.
    #[arg(long)]
    pub(crate) spiffe: Option<String>,
    /// Reason: unspecified, key-compromise, ca-compromise, affiliation-changed,
    /// superseded, cessation-of-operation, privilege-withdrawn.
    #[arg(long, default_value = "unspecified")]
    pub(crate) reason: RevocationReason,
    /// Print JSON instead of lines.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The environment variable naming the CA directory when `--dir` is not given.
pub(crate) const CA_DIR_ENV: &str = "HYBRIDGE_CA_DIR";

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
    // A folder that came from the environment says so: the operator may not know it is set.
    let typed = std::env::args().any(|a| a == "--dir" || a.starts_with("--dir="));
    let from_env = !typed && std::env::var_os(CA_DIR_ENV).is_some_and(|v| Path::new(&v) == dir);
    CertificateAuthority::open(dir).with_context(|| {
        let source = if from_env {
            format!(" (from {CA_DIR_ENV})")
        } else {
            String::new()
        };
        format!("opening CA in {}{source}", dir.display())
    })
}

fn time_text(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Runs a parsed command, printing results to stdout.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(args) => init(&args),
        Command::Issue(command) => issue(command),
        Command::List { dir, json } => list(&dir, json),
        Command::Revoke(args) => revoke(&args),
        Command::Crl {
            dir,
            out,
            next_update,
        } => crl(&dir, &out, next_update),
        Command::Inspect { file, dir, json } => inspect_file(&file, dir.as_deref(), json),
        Command::Completions { shell } => {
            crate::command_line::write_completion(
                <Cli as clap::CommandFactory>::command(),
                shell,
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man { dir } => {
            let pages = crate::command_line::write_man_pages(
                <Cli as clap::CommandFactory>::command(),
                &dir,
            )
            .with_context(|| format!("writing man pages into {}", dir.display()))?;
            println!("wrote {} man page(s) into {}", pages.len(), dir.display());
            Ok(())
        }
    }
}

/// `hybridge-ca init`: creates the CA and says where and until when it is valid.
fn init(args: &InitArgs) -> Result<()> {
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
    Ok(())
}

/// `hybridge-ca issue node|service|admin`: issues the certificate, writes it and its key, and
/// reports it.
fn issue(command: IssueCommand) -> Result<()> {
    match command {
        IssueCommand::Node {
            dir,
            site,
            name,
            dns,
            ip,
            validity,
            out,
            json,
        } => {
            let ca = open(&dir)?;
            let issued = ca
                .issue_node(&site, &name, &dns, &ip, validity)
                .context("issuing node certificate")?;
            report_issued(&issued, &out, json)
        }
        IssueCommand::Service {
            dir,
            name,
            dns,
            validity,
            out,
            json,
        } => {
            let ca = open(&dir)?;
            let issued = ca
                .issue_service(&name, &dns, validity)
                .context("issuing service certificate")?;
            report_issued(&issued, &out, json)
        }
        IssueCommand::Admin {
            dir,
            name,
            validity,
            out,
            json,
        } => {
            let ca = open(&dir)?;
            let issued = ca
                .issue_admin(&name, validity)
                .context("issuing administrator certificate")?;
            report_issued(&issued, &out, json)
        }
    }
}

/// `hybridge-ca list`: every issued certificate, as a table or as JSON.
fn list(dir: &Path, json: bool) -> Result<()> {
    let ca = open(dir)?;
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
    Ok(())
}

/// `hybridge-ca revoke`: revokes one serial, or every still-valid certificate of a SPIFFE id
/// (refusing when there is none), and reminds the operator to publish a CRL.
fn revoke(args: &RevokeArgs) -> Result<()> {
    let ca = open(&args.dir)?;
    let (count, what) = match (&args.serial, &args.spiffe) {
        (Some(serial), _) => {
            ca.revoke_serial(serial, args.reason)
                .with_context(|| format!("revoking serial {serial}"))?;
            (1, serial.clone())
        }
        (None, Some(uri)) => {
            let id = SpiffeId::parse(uri).context("--spiffe")?;
            let n = ca
                .revoke_spiffe(&id, args.reason)
                .with_context(|| format!("revoking {id}"))?;
            if n == 0 {
                bail!(
                    "revoking {id}: no still-valid certificate for it in {}",
                    args.dir.display()
                );
            }
            (n, id.to_string())
        }
        (None, None) => bail!("give a SERIAL or --spiffe ID"),
    };
    if args.json {
        let doc = serde_json::json!({
            "serial": args.serial,
            "spiffe_id": args.spiffe,
            "revoked": count,
            "reason": args.reason.as_str(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        if args.serial.is_some() {
            println!("revoked {what} ({})", args.reason);
        } else {
            println!("revoked {count} certificate(s) of {what} ({})", args.reason);
        }
        println!("run `hybridge-ca crl` and distribute the CRL so nodes reject it");
    }
    Ok(())
}

/// `hybridge-ca crl`: writes a CRL current for `next_update` to `out`.
fn crl(dir: &Path, out: &Path, next_update: Duration) -> Result<()> {
    let ca = open(dir)?;
    let pem = ca
        .crl_pem_valid_for(next_update)
        .context("generating CRL")?;
    files::write_atomic(out, pem.as_bytes(), PUBLIC_MODE)
        .with_context(|| format!("writing CRL {}", out.display()))?;
    let revoked = ca.list()?.iter().filter(|r| r.revocation.is_some()).count();
    println!(
        "wrote CRL with {revoked} revoked certificate(s) to {}",
        out.display()
    );
    Ok(())
}

/// `hybridge-ca inspect`: the certificate's summary and, with a CA directory, its status there.
fn inspect_file(file: &Path, dir: Option<&Path>, json: bool) -> Result<()> {
    let bytes =
        std::fs::read(file).with_context(|| format!("reading certificate {}", file.display()))?;
    let summary =
        inspect::summarize(&bytes).with_context(|| format!("inspecting {}", file.display()))?;
    let status = match dir {
        Some(dir) => Some(status_in(dir, &summary.serial_hex)?),
        None => None,
    };
    if json {
        let mut doc = summary_json(&summary);
        if let Some((status, _)) = &status {
            doc["status"] = serde_json::Value::from(status.as_str());
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{summary}");
        if let Some((status, revoked)) = status {
            println!("status:      {}", revoked.unwrap_or(status));
        }
    }
    Ok(())
}

/// The status of the certificate `serial_hex` in the CA at `dir` (`not issued by this CA`
/// when it did not issue it), and for a revoked one the line saying when and why.
fn status_in(dir: &Path, serial_hex: &str) -> Result<(String, Option<String>)> {
    let ca = open(dir)?;
    Ok(match ca.find_serial(serial_hex)? {
        None => ("not issued by this CA".to_string(), None),
        Some(IssuedRecord {
            revocation: Some(rev),
            ..
        }) => (
            "revoked".to_string(),
            Some(format!("REVOKED at {} ({})", time_text(rev.at), rev.reason)),
        ),
        Some(record) => (record.status().as_str().to_string(), None),
    })
}

fn report_issued(
    issued: &crate::authority::IssuedCertificate,
    out: &Path,
    json: bool,
) -> Result<()> {
    let (pem, key) = issued
        .write(out)
        .with_context(|| format!("writing certificate for {}", issued.spiffe_id))?;
    if json {
        let doc = serde_json::json!({
            "spiffe_id": issued.spiffe_id.to_string(),
            "serial": issued.serial_hex,
            "not_after": time_text(issued.not_after),
            "certificate": pem,
            "key": key,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
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

fn summary_json(s: &inspect::CertificateSummary) -> serde_json::Value {
    serde_json::json!({
        "subject": s.subject,
        "issuer": s.issuer,
        "serial": s.serial_hex,
        "not_before": time_text(s.not_before),
        "not_after": time_text(s.not_after),
        "uris": s.uris,
        "dns_names": s.dns_names,
        "ips": s.ips,
        "extended_key_usage": s.extended_key_usage,
        "sha256_fingerprint": s.sha256_fingerprint,
        "is_ca": s.is_ca,
        "certificates_in_file": s.certificates_in_file,
    })
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
    fn every_argument_and_subcommand_has_help() {
        let missing = crate::command_line::undocumented_arguments(&Cli::command());
        assert!(missing.is_empty(), "no help text: {missing:#?}");
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
