//! `hybridge dev`: a complete bridge on loopback from one command and no files.
//!
//! An in-process CA in a temp dir, a cloud node and an on-prem node joined by a real QUIC
//! tunnel (each with its admin socket in the temp dir), a demo upstream on each side, the same
//! sample policy on both nodes, and ready-to-paste curl and `hybridge` commands.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hybridge_ca::authority::{CertificateAuthority, InitOptions};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::demo::DemoUpstream;
use crate::node::Node;
use crate::workers::Workers;

const TRUST_DOMAIN: &str = "dev.hybridge";

/// The sample policy applied to both nodes: `web` (on-prem) may use `inventory` (cloud),
/// `reporting` (cloud) may read `ledger` (on-prem); everything else is denied by default.
pub(crate) const SAMPLE_POLICY: &str = r#"
[[rule]]
id = "web-to-inventory"
source = "web"
source_site = "onprem"
destination = "inventory"
action = "allow"
description = "the on-prem web tier uses the cloud inventory service"

[[rule]]
id = "reporting-reads-ledger"
source = "reporting"
source_site = "cloud"
destination = "ledger"
action = "allow"
methods = ["GET", "HEAD"]
path_prefix = "/"
description = "cloud reporting may read the on-prem ledger, not change it"

# Which site may serve each service: a node of any other site announcing it is ignored.
[[export]]
service = "inventory"
sites = "cloud"

[[export]]
service = "ledger"
sites = "onprem"
"#;

/// A running dev environment.
pub(crate) struct DevEnvironment {
    pub(crate) onprem: Node,
    pub(crate) cloud: Node,
    pub(crate) dir: tempfile::TempDir,
    upstreams_cancel: CancellationToken,
}

fn port(base: u16, offset: u16) -> u16 {
    if base == 0 {
        0
    } else {
        base.saturating_add(offset)
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// `127.0.0.1` at `base_port + offset`, or a free port when `base_port` is 0.
fn dev_addr(base_port: u16, offset: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port(base_port, offset)))
}

/// A new CA in `root/ca`, a certificate and key for each dev node (`root/NAME.pem`,
/// `root/NAME.key`, valid a day for localhost and 127.0.0.1) and the CA bundle `root/ca.pem`.
fn issue_certificates(root: &Path) -> anyhow::Result<()> {
    let ca = CertificateAuthority::init(&root.join("ca"), TRUST_DOMAIN, InitOptions::default())?;
    let loopback = [std::net::IpAddr::from([127, 0, 0, 1])];
    for (site, name) in [("onprem", "onprem-1"), ("cloud", "cloud-1")] {
        ca.issue_node(
            site,
            name,
            &["localhost".to_owned()],
            &loopback,
            Duration::from_secs(86_400),
        )?
        .write(&root.join(name))?;
    }
    write(&root.join("ca.pem"), &ca.ca_cert_pem())
}

/// The cloud node's config: listens for the on-prem site, exports `inventory` (the demo
/// upstream at `inventory`) and imports `ledger` for the `reporting` caller.
fn cloud_toml(base_port: u16, inventory: SocketAddr) -> String {
    format!(
        r#"# hybridge dev: cloud node
[node]
name = "cloud-1"
site = "cloud"
trust_domain = "{TRUST_DOMAIN}"
data_dir = "cloud-data"

[tls]
ca = "ca.pem"
cert = "cloud-1.pem"
key = "cloud-1.key"

[tunnel]
listen = "{tunnel}"
allowed_sites = ["onprem"]

[admin]
listen = "{admin}"
socket = "cloud-admin.sock"

[[export]]
name = "inventory"
endpoints = ["{inventory}"]

[[import]]
service = "ledger"
listen = "{ledger_import}"
caller = "reporting"
"#,
        tunnel = dev_addr(base_port, 0),
        admin = dev_addr(base_port, 11),
        ledger_import = dev_addr(base_port, 2),
    )
}

/// The on-prem node's config: dials the cloud node at `tunnel`, exports `ledger` (the demo
/// upstream at `ledger`), imports `inventory` for `web` and runs a gateway for `web`.
fn onprem_toml(base_port: u16, tunnel: SocketAddr, ledger: SocketAddr) -> String {
    format!(
        r#"# hybridge dev: on-prem node (dials out to the cloud node)
[node]
name = "onprem-1"
site = "onprem"
trust_domain = "{TRUST_DOMAIN}"
data_dir = "onprem-data"

[tls]
ca = "ca.pem"
cert = "onprem-1.pem"
key = "onprem-1.key"

[tunnel]
bind = "127.0.0.1:0"

[[peer]]
address = "{tunnel}"
site = "cloud"
connections = 2

[admin]
listen = "{admin}"
socket = "onprem-admin.sock"

[[export]]
name = "ledger"
endpoints = ["{ledger}"]

[[import]]
service = "inventory"
listen = "{inventory_import}"
caller = "web"

[gateway]
listen = "{gateway}"
caller = "web"
suffix = "hybridge"
"#,
        admin = dev_addr(base_port, 10),
        inventory_import = dev_addr(base_port, 1),
        gateway = dev_addr(base_port, 3),
    )
}

/// Writes [`SAMPLE_POLICY`] to `root/acl.toml` and applies it to each of `nodes`, as
/// `hybridge dev`.
fn apply_sample_policy(root: &Path, nodes: [&Node; 2]) -> anyhow::Result<()> {
    let policy_path = root.join("acl.toml");
    write(&policy_path, SAMPLE_POLICY)?;
    for node in nodes {
        let policy = crate::acl::parse_acl_file(&policy_path, SAMPLE_POLICY)?;
        node.state.acl.apply(policy, "hybridge dev", false)?;
    }
    Ok(())
}

impl DevEnvironment {
    /// Starts everything, each node spread over `workers`.
    pub(crate) async fn start_on(base_port: u16, workers: Arc<Workers>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("hybridge-dev-")
            .tempdir()
            .context("creating a temp dir")?;
        let root = dir.path();
        issue_certificates(root)?;

        let upstreams_cancel = CancellationToken::new();
        let addr = |offset| dev_addr(base_port, offset);
        let inventory = DemoUpstream::start("inventory", addr(20), upstreams_cancel.child_token())
            .await
            .context("starting the inventory demo upstream")?;
        let ledger = DemoUpstream::start("ledger", addr(21), upstreams_cancel.child_token())
            .await
            .context("starting the ledger demo upstream")?;

        let cloud_path = root.join("cloud.toml");
        write(&cloud_path, &cloud_toml(base_port, inventory.local_addr()))?;
        let cloud = Node::start_on(Config::load(&cloud_path)?, workers.clone())
            .await
            .context("starting the cloud node")?;
        let tunnel = cloud
            .addresses()
            .tunnel
            .context("the cloud node has no tunnel address")?;

        let onprem_path = root.join("onprem.toml");
        write(
            &onprem_path,
            &onprem_toml(base_port, tunnel, ledger.local_addr()),
        )?;
        let onprem = Node::start_on(Config::load(&onprem_path)?, workers)
            .await
            .context("starting the on-prem node")?;

        apply_sample_policy(root, [&onprem, &cloud])?;
        let limit = Duration::from_secs(10);
        if !onprem.wait_for_route("inventory", limit).await
            || !cloud.wait_for_route("ledger", limit).await
        {
            anyhow::bail!("the tunnel between the dev nodes did not come up within {limit:?}");
        }
        Ok(Self {
            onprem,
            cloud,
            dir,
            upstreams_cancel,
        })
    }

    /// The commands `hybridge dev` prints: curl through the tunnel, `hybridge` through the admin
    /// sockets, curl to the read-only metrics listener.
    pub(crate) fn curl_commands(&self) -> Vec<(String, String)> {
        let hybridge = hybridge_command(
            std::env::current_exe().ok().as_deref(),
            std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
        );
        let onprem = self.onprem.addresses();
        let cloud = self.cloud.addresses();
        let inventory = onprem.imports[0].1;
        let ledger = cloud.imports[0].1;
        let mut commands = vec![
            (
                "on-prem web → cloud inventory (allowed)".into(),
                format!("curl -sS -i http://{inventory}/echo/items?sku=42"),
            ),
            (
                "cloud reporting → on-prem ledger (allowed, read-only)".into(),
                format!("curl -sS -i http://{ledger}/echo/balance"),
            ),
            (
                "cloud reporting → on-prem ledger POST (denied by policy: 403)".into(),
                format!("curl -sS -i -X POST -d amount=5 http://{ledger}/echo/transfer"),
            ),
            (
                "HTTP/2 without TLS (h2c) through the tunnel".into(),
                format!("curl -sS -i --http2-prior-knowledge http://{inventory}/echo/h2"),
            ),
            (
                "a 10 MiB streamed download, checked on arrival".into(),
                format!(
                    "curl -sS -o /dev/null -w '%{{size_download}} bytes %{{http_code}}\\n' http://{inventory}/bytes/10485760"
                ),
            ),
        ];
        if let Some(gateway) = onprem.gateway {
            commands.push((
                "the shared gateway routes by Host".into(),
                format!(
                    "curl -sS -i -H 'Host: inventory.hybridge' http://{gateway}/echo/via-gateway"
                ),
            ));
        }
        commands.push((
            "on-prem node status, through its admin socket".into(),
            format!(
                "{hybridge} status --admin unix:{}",
                onprem.admin_socket.display()
            ),
        ));
        commands.push((
            "the cloud node's rules; change them with acl add/rm/apply on the same socket".into(),
            format!(
                "{hybridge} acl list --admin unix:{}",
                cloud.admin_socket.display()
            ),
        ));
        commands.push((
            "who changed what (the sample policy was applied by `hybridge dev`)".into(),
            format!(
                "{hybridge} acl log --admin unix:{}",
                cloud.admin_socket.display()
            ),
        ));
        commands.push((
            "metrics, from the read-only TCP listener".into(),
            format!(
                "curl -sS http://{}/metrics | grep hybridge_requests_total",
                onprem.admin
            ),
        ));
        commands
    }

    /// Stops both nodes (draining) and the demo upstreams, and removes the temp dir.
    pub(crate) async fn shutdown(self) {
        let Self {
            onprem,
            cloud,
            upstreams_cancel,
            dir,
            ..
        } = self;
        onprem.shutdown().await;
        cloud.shutdown().await;
        upstreams_cancel.cancel();
        drop(dir);
    }
}

/// How the printed commands run `hybridge`: the binary that is running, by its absolute path
/// (quoted for the shell when it needs it), so they work whatever is on PATH. Under `cargo
/// run` (`cargo` sets CARGO_MANIFEST_DIR for the process it runs) the path is cargo's build
/// output, which the next build replaces, so `cargo run` is printed instead.
pub(crate) fn hybridge_command(current_exe: Option<&Path>, under_cargo: bool) -> String {
    match current_exe {
        Some(exe) if !under_cargo => {
            let text = exe.display().to_string();
            if text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
            {
                text
            } else {
                format!("'{}'", text.replace('\'', r"'\''"))
            }
        }
        _ => "cargo run -q -p hybridge --".to_owned(),
    }
}

/// `hybridge dev`: start, print the commands, wait for Ctrl-C, stop cleanly; a second Ctrl-C
/// while stopping exits at once (130). `Ok` is the exit code.
pub(crate) async fn run(base_port: u16, workers: Arc<Workers>) -> anyhow::Result<u8> {
    let env = DevEnvironment::start_on(base_port, workers).await?;
    println!(
        "hybridge dev: CA, on-prem node and cloud node are up in {}",
        env.dir.path().display()
    );
    println!("policy (same on both nodes):{SAMPLE_POLICY}");
    for (what, command) in env.curl_commands() {
        println!("# {what}\n{command}\n");
    }
    println!("hybridge dev ready");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("stopping…");
    tokio::select! {
        () = env.shutdown() => Ok(0),
        _ = tokio::signal::ctrl_c() => crate::daemon::exit_on_second_signal(libc::SIGINT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_commands_name_the_running_binary() {
        assert_eq!(
            hybridge_command(Some(Path::new("/usr/bin/hybridge")), false),
            "/usr/bin/hybridge"
        );
        assert_eq!(
            hybridge_command(Some(Path::new("/opt/my tools/hybridge")), false),
            "'/opt/my tools/hybridge'"
        );
        assert_eq!(
            hybridge_command(Some(Path::new("/repo/target/debug/hybridge")), true),
            "cargo run -q -p hybridge --"
        );
        assert_eq!(hybridge_command(None, false), "cargo run -q -p hybridge --");
    }
}
