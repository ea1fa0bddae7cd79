//! The Terraform module for the cloud side, checked without cloud access: every `.tf` file
//! parses as HCL, every variable and output is documented and typed, every reference names
//! something that exists, module calls pass only known inputs; the cloud-init and
//! hybridge.toml templates render with the variables Terraform passes them; the rendered
//! cloud-init passes `cloud-init schema`; the rendered config passes `hybridge check-config`
//! with the right certificate and fails, naming the site, with a certificate for another.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use hcl::{Body, Expression, ObjectKey};
use hybridge_tests::*;

fn terraform_dir() -> PathBuf {
    repo_root().join("terraform")
}

/// Every `.tf` file of the Terraform module in `dir`, parsed.
fn module(dir: &Path) -> Vec<(PathBuf, String, Body)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tf"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .tf files in {}", dir.display());
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let body = hcl::parse(&text)
                .unwrap_or_else(|e| panic!("{} is not valid HCL: {e}", path.display()));
            (path, text, body)
        })
        .collect()
}

/// What a module declares, as the names references use.
#[derive(Default, Debug)]
struct Declared {
    variables: BTreeMap<String, bool>, // name -> has a default
    locals: BTreeSet<String>,
    resources: BTreeSet<String>, // TYPE.NAME
    data: BTreeSet<String>,      // TYPE.NAME
    modules: BTreeSet<String>,
}

fn declared(files: &[(PathBuf, String, Body)]) -> Declared {
    let mut d = Declared::default();
    for (path, _, body) in files {
        for block in body.blocks() {
            let labels: Vec<&str> = block.labels().iter().map(|l| l.as_str()).collect();
            let attr = |key: &str| block.body().attributes().find(|a| a.key() == key);
            match block.identifier() {
                "variable" => {
                    let name = labels[0];
                    match attr("description").map(|a| a.expr()) {
                        Some(Expression::String(s)) if s.len() > 10 => {}
                        other => panic!(
                            "{}: variable `{name}` needs a description (has {other:?})",
                            path.display()
                        ),
                    }
                    assert!(
                        attr("type").is_some(),
                        "{}: variable `{name}` needs a type",
                        path.display()
                    );
                    d.variables
                        .insert(name.to_owned(), attr("default").is_some());
                }
                "output" => {
                    assert!(
                        matches!(
                            attr("description").map(|a| a.expr()),
                            Some(Expression::String(_))
                        ),
                        "{}: output `{}` needs a description",
                        path.display(),
                        labels[0]
                    );
                }
                "locals" => {
                    d.locals
                        .extend(block.body().attributes().map(|a| a.key().to_owned()));
                }
                "resource" => {
                    d.resources.insert(format!("{}.{}", labels[0], labels[1]));
                }
                "data" => {
                    d.data.insert(format!("{}.{}", labels[0], labels[1]));
                }
                "module" => {
                    d.modules.insert(labels[0].to_owned());
                }
                _ => {}
            }
        }
    }
    d
}

/// `a.b.c` style tokens in HCL text, outside comments.
fn references(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('#') || trimmed.starts_with("//") {
            continue;
        }
        let mut token = String::new();
        for c in line.chars().chain([' ']) {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                token.push(c);
            } else {
                if token.contains('.') {
                    out.push(token.split('.').map(str::to_owned).collect());
                }
                token.clear();
            }
        }
    }
    out
}

fn check_references(files: &[(PathBuf, String, Body)], d: &Declared) {
    for (path, text, _) in files {
        for r in references(text) {
            let at = || format!("{}: `{}`", path.display(), r.join("."));
            match r[0].as_str() {
                "var" => assert!(
                    d.variables.contains_key(&r[1]),
                    "{} names no variable",
                    at()
                ),
                "local" => assert!(d.locals.contains(&r[1]), "{} names no local", at()),
                "module" => assert!(d.modules.contains(&r[1]), "{} names no module", at()),
                "data" => assert!(
                    d.data.contains(&format!("{}.{}", r[1], r[2])),
                    "{} names no data source",
                    at()
                ),
                t if t.starts_with("aws_") && r.len() >= 2 => assert!(
                    d.resources.contains(&format!("{}.{}", r[0], r[1])),
                    "{} names no resource",
                    at()
                ),
                _ => {}
            }
        }
    }
}

#[test]
fn every_terraform_file_parses_is_documented_and_references_what_exists() {
    let root = terraform_dir();
    let files = module(&root);
    let d = declared(&files);
    for expected in [
        "aws_lb.tunnel",
        "aws_security_group.node",
        "aws_iam_role.node",
        "aws_instance.node",
    ] {
        assert!(
            d.resources.contains(expected),
            "module lacks {expected}: {d:?}"
        );
    }
    check_references(&files, &d);

    // The example is a module of its own that calls ours.
    let example_dir = root.join("examples/basic");
    let example = module(&example_dir);
    let ed = declared(&example);
    check_references(&example, &ed);
    let call = example
        .iter()
        .flat_map(|(_, _, b)| b.blocks())
        .find(|b| b.identifier() == "module")
        .expect("examples/basic calls the module");
    let passed: BTreeSet<String> = call
        .body()
        .attributes()
        .map(|a| a.key().to_owned())
        .filter(|k| k != "source")
        .collect();
    for input in &passed {
        assert!(
            d.variables.contains_key(input),
            "examples/basic passes unknown input `{input}`"
        );
    }
    for (name, has_default) in &d.variables {
        assert!(
            *has_default || passed.contains(name),
            "examples/basic does not pass required input `{name}`"
        );
    }
    // The on-prem side of the example: its node configs and its policy parse as they are.
    let mut configs = 0;
    for entry in std::fs::read_dir(&example_dir).unwrap() {
        let path = entry.unwrap().path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") if path.file_name().unwrap() == "acl.toml" => {
                let text = std::fs::read_to_string(&path).unwrap();
                let policy = hybridge::acl::parse_acl_file(&path, &text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!policy.rules.is_empty());
                assert!(policy.rules.iter().all(|r| r.source_site.is_some()));
                assert!(!policy.exports.is_empty());
            }
            Some("toml") => {
                let config =
                    hybridge::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(config.node.site, "dc1");
                assert_eq!(config.peers[0].site, "aws", "the example's cloud site");
                configs += 1;
            }
            _ => {}
        }
    }
    assert_eq!(configs, 2, "examples/basic shows an on-prem pair");

    // Security group: the tunnel port is open to the on-prem CIDRs only, and no rule admits
    // the admin port.
    let network = std::fs::read_to_string(root.join("main.tf")).unwrap();
    assert!(
        !network.contains("7180\n") && !network.contains("= 7180"),
        "admin port exposed"
    );
    assert!(network.contains("cidr_ipv4         = each.value"));

    // The VM image: with image_id the instances boot it and the user data installs nothing;
    // without it, ami_id plus the .deb at deb_url, and one of the two must be complete.
    let main = &files
        .iter()
        .find(|(p, _, _)| p.ends_with("main.tf"))
        .unwrap()
        .2;
    let resource = |kind: &str, name: &str| {
        main.blocks()
            .find(|b| {
                b.identifier() == "resource"
                    && b.labels()[0].as_str() == kind
                    && b.labels()[1].as_str() == name
            })
            .unwrap_or_else(|| panic!("main.tf has no {kind}.{name}"))
    };
    let attribute = |block: &hcl::Block, key: &str| {
        block
            .body()
            .attributes()
            .find(|a| a.key() == key)
            .map(|a| a.expr().to_string())
            .unwrap_or_else(|| panic!("no attribute {key}"))
    };
    // The tunnel port, UDP and TCP: one TCP_UDP listener and group (an NLB cannot listen on
    // one port twice), and a TCP rule beside the UDP one for networks that block UDP.
    for (kind, name) in [
        ("aws_lb_target_group", "tunnel"),
        ("aws_lb_listener", "tunnel"),
    ] {
        assert_eq!(attribute(resource(kind, name), "protocol"), "\"TCP_UDP\"");
    }
    for (name, protocol) in [("tunnel", "udp"), ("tunnel_tcp", "tcp")] {
        let rule = resource("aws_vpc_security_group_ingress_rule", name);
        assert_eq!(attribute(rule, "ip_protocol"), format!("\"{protocol}\""));
        assert_eq!(attribute(rule, "from_port"), "var.tunnel_port");
    }
    let template = resource("aws_launch_template", "node");
    assert_eq!(
        attribute(template, "image_id"),
        "var.image_id != \"\" ? var.image_id : var.ami_id"
    );
    let precondition = template
        .body()
        .blocks()
        .find(|b| b.identifier() == "lifecycle")
        .and_then(|l| l.body().blocks().find(|b| b.identifier() == "precondition"))
        .expect("the launch template checks that image_id or ami_id + deb_url are set");
    assert_eq!(
        attribute(precondition, "condition"),
        "var.image_id != \"\" || (var.ami_id != \"\" && var.deb_url != \"\")"
    );
    let user_data = attribute(resource("aws_instance", "node"), "user_data");
    assert!(
        user_data.contains("deb_url = var.image_id == \"\" ? var.deb_url : \"\""),
        "{user_data}"
    );
    assert!(
        d.variables.get("image_id") == Some(&true),
        "image_id is optional"
    );

    // The README documents every input and output.
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for name in d.variables.keys() {
        assert!(
            readme.contains(&format!("`{name}`")),
            "terraform/README.md lacks input `{name}`"
        );
    }
    for (_, _, body) in &files {
        for block in body.blocks().filter(|b| b.identifier() == "output") {
            let name = block.labels()[0].as_str();
            assert!(
                readme.contains(&format!("`{name}`")),
                "terraform/README.md lacks output `{name}`"
            );
        }
    }
}

/// The object keys of every `templatefile(PATH, { ... })` call in `expr`, by template file name.
fn templatefile_calls(expr: &Expression, out: &mut BTreeMap<String, BTreeSet<String>>) {
    match expr {
        Expression::FuncCall(call) => {
            if call.name.name.as_str() == "templatefile" {
                let path = match &call.args[0] {
                    Expression::TemplateExpr(t) => t.to_string(),
                    other => format!("{other:?}"),
                };
                let file = path
                    .trim_matches('"')
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_owned();
                if let Expression::Object(object) = &call.args[1] {
                    let keys = object
                        .keys()
                        .map(|k| match k {
                            ObjectKey::Identifier(i) => i.as_str().to_owned(),
                            other => format!("{other:?}"),
                        })
                        .collect();
                    out.insert(file, keys);
                }
            }
            for arg in &call.args {
                templatefile_calls(arg, out);
            }
        }
        Expression::Object(object) => {
            for value in object.values() {
                templatefile_calls(value, out);
            }
        }
        _ => {}
    }
}

/// The variables main.tf passes each template, checked against the ones this test renders
/// them with, so the test renders what Terraform would.
fn terraform_template_vars() -> BTreeMap<String, BTreeSet<String>> {
    let body =
        hcl::parse(&std::fs::read_to_string(terraform_dir().join("main.tf")).unwrap()).unwrap();
    let mut calls = BTreeMap::new();
    for block in body.blocks() {
        for attr in block.body().attributes() {
            templatefile_calls(attr.expr(), &mut calls);
        }
    }
    calls
}

/// The set-up script cloud-init writes to /usr/local/sbin/hybridge-setup, un-indented.
fn setup_script(cloud_init: &str) -> String {
    cloud_init
        .split("content: |\n")
        .nth(1)
        .unwrap()
        .split("\nruncmd:")
        .next()
        .unwrap()
        .lines()
        .map(|l| l.strip_prefix("      ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn cloud_init_renders_passes_its_schema_and_configures_a_node_that_checks_out() {
    let pki = Pki::with_trust_domain("corp.example");
    let good = pki.node("aws", "cloud-1");
    let wrong_site = pki.node("dc1", "cloud-1");
    let toml_vars = |config_dir: &Path| {
        serde_json::json!({
            "node_name": "cloud-1",
            "site": "aws",
            "trust_domain": "corp.example",
            "config_dir": config_dir.display().to_string(),
            "data_dir": pki.path("data").display().to_string(),
            "tunnel_port": 7443,
            "onprem_sites": ["dc1", "dc2"],
            "announce": ["10.20.1.7:7443", "10.20.2.9:7443"],
            "with_crl": false,
            "exports": [
                {"name": "recommendations", "endpoints": ["10.20.1.10:50051", "10.20.2.10:50051"], "protocol": "h2c"},
                {"name": "catalog", "endpoints": ["10.20.1.20:8080"], "protocol": "http1"}
            ],
            "imports": [{"service": "billing", "port": 8081, "caller": "checkout"}],
        })
    };
    let calls = terraform_template_vars();
    assert_eq!(
        calls.get("hybridge.toml.tftpl"),
        Some(&keys(&toml_vars(Path::new("/etc/hybridge")))),
        "main.tf passes hybridge.toml.tftpl other variables than this test renders it with"
    );

    // The production rendering, wrapped into cloud-init exactly as main.tf does.
    let toml = render_terraform_template(
        "hybridge.toml.tftpl",
        &toml_vars(Path::new("/etc/hybridge")),
    );
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // deb_url is what main.tf passes: the .deb's URL without image_id, empty with it (the
    // VM image has the package baked in).
    let deb = "https://packages.example.com/hybridge_0.1.0_arm64.deb";
    for (crl, acl, deb_url) in [
        ("", "", deb),
        (
            "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hybridge/crl-AbCdEf",
            "[[rule]]\nsource = \"web\"\ndestination = \"catalog\"\naction = \"allow\"\n",
            deb,
        ),
        ("", "", ""),
    ] {
        let init_vars = serde_json::json!({
            "node_name": "cloud-1",
            "site": "aws",
            "region": "eu-west-1",
            "deb_url": deb_url,
            "ca_secret_arn": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hybridge/ca-AbCdEf",
            "crl_secret_arn": crl,
            "cert_secret_arn": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hybridge/node/cloud-1-AbCdEf",
            "acl_b64": if acl.is_empty() { String::new() } else { b64(acl) },
            "hybridge_toml_b64": b64(&toml),
        });
        assert_eq!(
            calls.get("cloud-init.yaml.tftpl"),
            Some(&keys(&init_vars)),
            "main.tf passes cloud-init.yaml.tftpl other variables than this test renders it with"
        );
        let cloud_init = render_terraform_template("cloud-init.yaml.tftpl", &init_vars);
        assert!(cloud_init.starts_with("#cloud-config\n"));
        let file = pki.path("user-data.yaml");
        std::fs::write(&file, &cloud_init).unwrap();
        let output = Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(&file)
            .output()
            .expect("cloud-init is installed by .ci/run");
        assert!(
            output.status.success(),
            "cloud-init schema rejects the rendered user data: {}{}\n{cloud_init}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // The set-up script is valid shell, fails loudly, and starts the unit only last.
        let script = setup_script(&cloud_init);
        let script_file = pki.path("hybridge-setup");
        std::fs::write(&script_file, &script).unwrap();
        let syntax = Command::new("bash")
            .arg("-n")
            .arg(&script_file)
            .output()
            .unwrap();
        assert!(
            syntax.status.success(),
            "{}\n{script}",
            String::from_utf8_lossy(&syntax.stderr)
        );
        assert!(script.contains("set -euo pipefail"));
        assert_eq!(
            script.contains("\"CRL\" > \"$stage/crl.pem\""),
            !crl.is_empty()
        );
        let check = script.find("hybridge check-config").unwrap();
        let install = script.find("\"$etc/hybridge.toml\"\n").unwrap();
        let enable = script.find("systemctl enable --now").unwrap();
        assert!(
            check < install && install < enable,
            "config must be checked before it is installed, and installed before the unit starts"
        );
        assert_eq!(
            cloud_init.contains("/run/hybridge-setup/acl.toml"),
            !acl.is_empty()
        );
        // From the VM image nothing is installed at boot: no package step, no download.
        let installs = ["package_update:", "packages:", "apt-get install", "curl "]
            .iter()
            .filter(|step| cloud_init.contains(*step))
            .count();
        if deb_url.is_empty() {
            assert_eq!(
                installs, 0,
                "the image path installs at boot:\n{cloud_init}"
            );
            assert!(script.contains("from the image"), "{script}");
        } else {
            assert_eq!(installs, 4, "{cloud_init}");
        }
    }

    // What cloud-init installs: with the right certificate it checks out (the setup script
    // runs exactly this command against its staging copy).
    let config_dir = pki.path("etc");
    std::fs::create_dir_all(&config_dir).unwrap();
    let install = |files: &NodeFiles| {
        std::fs::copy(&files.ca, config_dir.join("ca.pem")).unwrap();
        std::fs::copy(&files.cert, config_dir.join("node.pem")).unwrap();
        std::fs::copy(&files.key, config_dir.join("node.key")).unwrap();
    };
    let config = config_dir.join("hybridge.toml");
    std::fs::write(
        &config,
        render_terraform_template("hybridge.toml.tftpl", &toml_vars(&config_dir)),
    )
    .unwrap();
    let check = || hybridge_cli(&["check-config", "--config", config.to_str().unwrap()]);
    install(&good);
    let (code, stdout, stderr) = check();
    assert_eq!(code, 0, "{stdout}{stderr}");
    let parsed = hybridge::config::Config::load(&config).unwrap();
    assert_eq!(parsed.tunnel.allowed_sites, ["dc1", "dc2"]);
    assert_eq!(
        parsed.tunnel.announce,
        [
            "10.20.1.7:7443".parse::<std::net::SocketAddr>().unwrap(),
            "10.20.2.9:7443".parse().unwrap()
        ]
    );
    assert_eq!(parsed.export_names(), ["catalog", "recommendations"]);
    assert_eq!(parsed.imports[0].listen.to_string(), "127.0.0.1:8081");
    assert_eq!(
        parsed.admin.health_listen.map(|a| a.to_string()).as_deref(),
        Some("0.0.0.0:7181"),
        "the NLB health check needs the health listener"
    );

    // A certificate for another site stops the set-up with a message naming both ids.
    install(&wrong_site);
    let (code, _, stderr) = check();
    assert_ne!(code, 0);
    assert!(
        stderr.contains("site/dc1/node/cloud-1") && stderr.contains("site/aws/node/cloud-1"),
        "{stderr}"
    );
}

const CA_ARN: &str = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hybridge/ca-AbCdEf";
const NODE_ARN: &str =
    "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hybridge/node/cloud-1-AbCdEf";

/// Stub commands for running the set-up script outside an instance: `aws` answers from files
/// (or fails like Secrets Manager does for a missing secret), `apt-get`, `curl` and `systemctl`
/// only record their calls, `install` and `runuser` drop the user switch (the test runs
/// without a `hybridge` account); `hybridge` is the real binary.
fn stub_bin(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let stubs = [
        ("aws", AWS_SECRETS_STUB),
        (
            "apt-get",
            "#!/bin/sh\necho \"apt-get $*\" >> \"$HYBRIDGE_SETUP_ROOT/calls.log\"\n",
        ),
        (
            "systemctl",
            "#!/bin/sh\necho \"systemctl $*\" >> \"$HYBRIDGE_SETUP_ROOT/calls.log\"\n",
        ),
        (
            "curl",
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = -o ] && : > \"$2\"; shift; done\n",
        ),
        (
            "install",
            "#!/bin/bash\nargs=()\nwhile [ $# -gt 0 ]; do case \"$1\" in -o|-g) shift 2; continue ;; esac; args+=(\"$1\"); shift; done\nexec /usr/bin/install \"${args[@]}\"\n",
        ),
        (
            "runuser",
            "#!/bin/sh\nwhile [ \"$1\" != -- ]; do shift; done\nshift\nexec \"$@\"\n",
        ),
    ];
    for (name, text) in stubs {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let _ = std::fs::remove_file(dir.join("hybridge"));
    std::os::unix::fs::symlink(binary("hybridge"), dir.join("hybridge")).unwrap();
}

struct SetupRun {
    code: i32,
    /// What the script printed (cloud-init sends it to the console).
    console: String,
    calls: String,
    root: PathBuf,
}

/// Which way the instance gets the package.
#[derive(Clone, Copy, PartialEq)]
enum Boot {
    /// A stock Debian AMI: the .deb is downloaded and installed at boot.
    DebAtBoot,
    /// The hybridge VM image (`image_id`): main.tf passes an empty deb_url.
    Image { package_installed: bool },
}

/// Runs the rendered set-up script in a scratch root, as cloud-init would after writing
/// its files, with `secrets` (ARN → value) in the stub secret store.
fn run_setup(work: &Path, name: &str, boot: Boot, secrets: &[(&str, String)]) -> SetupRun {
    let root = work.join(name);
    let stage = root.join("run/hybridge-setup");
    std::fs::create_dir_all(&stage).unwrap();
    let dpkg = root.join("var/lib/dpkg");
    std::fs::create_dir_all(&dpkg).unwrap();
    let status = if boot
        == (Boot::Image {
            package_installed: true,
        }) {
        "Package: hybridge\nStatus: install ok installed\nArchitecture: amd64\nVersion: 0.1.0-1\n\n"
    } else {
        ""
    };
    std::fs::write(dpkg.join("status"), status).unwrap();
    let store = work.join(format!("{name}-secrets"));
    std::fs::create_dir_all(&store).unwrap();
    for (arn, value) in secrets {
        std::fs::write(store.join(stub_secret_name(arn)), value).unwrap();
    }
    // What write_files puts in place before runcmd.
    let toml = render_terraform_template("hybridge.toml.tftpl", &production_toml_vars());
    std::fs::write(stage.join("hybridge.toml"), &toml).unwrap();
    let acl = "[[rule]]\nsource = \"web\"\ndestination = \"catalog\"\naction = \"allow\"\n";
    std::fs::write(stage.join("acl.toml"), acl).unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let deb_url = match boot {
        Boot::DebAtBoot => "https://packages.example.com/hybridge_0.1.0_amd64.deb",
        Boot::Image { .. } => "",
    };
    let cloud_init = render_terraform_template(
        "cloud-init.yaml.tftpl",
        &serde_json::json!({
            "node_name": "cloud-1",
            "site": "aws",
            "region": "eu-west-1",
            "deb_url": deb_url,
            "ca_secret_arn": CA_ARN,
            "crl_secret_arn": "",
            "cert_secret_arn": NODE_ARN,
            "acl_b64": b64(acl),
            "hybridge_toml_b64": b64(&toml),
        }),
    );
    let script = work.join(format!("{name}-setup.sh"));
    std::fs::write(&script, setup_script(&cloud_init)).unwrap();
    let bin = work.join("bin");
    let output = Command::new("bash")
        .arg(&script)
        .env("HYBRIDGE_SETUP_ROOT", &root)
        .env("STUB_SECRETS", &store)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    SetupRun {
        code: output.status.code().unwrap_or(-1),
        console: String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
        calls: std::fs::read_to_string(root.join("calls.log")).unwrap_or_default(),
        root,
    }
}

fn production_toml_vars() -> serde_json::Value {
    serde_json::json!({
        "node_name": "cloud-1",
        "site": "aws",
        "trust_domain": "corp.example",
        "config_dir": "/etc/hybridge",
        "data_dir": "/var/lib/hybridge",
        "tunnel_port": 7443,
        "onprem_sites": ["dc1"],
        "announce": ["10.20.1.7:7443"],
        "with_crl": false,
        "exports": [{"name": "catalog", "endpoints": ["10.20.1.20:8080"], "protocol": "http1"}],
        "imports": [],
    })
}

#[test]
fn the_setup_script_installs_only_a_checked_node_and_fails_loudly_otherwise() {
    let pki = Pki::with_trust_domain("corp.example");
    let work = pki.path("setup");
    stub_bin(&work.join("bin"));
    let ca = std::fs::read_to_string(pki.path("ca.pem")).unwrap();
    let node_secret = |files: &NodeFiles| {
        serde_json::json!({
            "cert": std::fs::read_to_string(&files.cert).unwrap(),
            "key": std::fs::read_to_string(&files.key).unwrap(),
        })
        .to_string()
    };

    // Everything present: installed with tight modes, policy applied, unit started last.
    let good = run_setup(
        &work,
        "good",
        Boot::DebAtBoot,
        &[
            (CA_ARN, ca.clone()),
            (NODE_ARN, node_secret(&pki.node("aws", "cloud-1"))),
        ],
    );
    assert_eq!(good.code, 0, "{}", good.console);
    assert!(
        good.console
            .contains("hybridge-setup: node cloud-1 is running"),
        "{}",
        good.console
    );
    let etc = good.root.join("etc/hybridge");
    for (file, mode) in [
        ("ca.pem", 0o600),
        ("node.pem", 0o600),
        ("node.key", 0o600),
        ("hybridge.toml", 0o640),
        ("acl.toml", 0o640),
    ] {
        let meta = std::fs::metadata(etc.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            mode,
            "{file}"
        );
    }
    assert!(
        good.root.join("var/lib/hybridge/hybridge.redb").exists(),
        "ACL policy not applied"
    );
    assert!(
        !good.root.join("run/hybridge-setup").exists(),
        "staging folder left behind"
    );
    assert!(good.calls.contains("apt-get install -y"), "{}", good.calls);
    assert!(
        good.calls
            .contains("systemctl enable --now hybridge.service"),
        "{}",
        good.calls
    );

    // A missing secret: the console names it and the reason; nothing is installed or started.
    let missing = run_setup(&work, "missing", Boot::DebAtBoot, &[(CA_ARN, ca.clone())]);
    assert_ne!(missing.code, 0);
    assert!(
        missing.console.contains(&format!(
            "hybridge-setup: FAILED: cannot read secret {NODE_ARN} (certificate of node cloud-1): An error occurred (ResourceNotFoundException)"
        )),
        "{}",
        missing.console
    );
    assert_eq!(
        missing.console.matches("hybridge-setup: FAILED").count(),
        1,
        "{}",
        missing.console
    );
    assert!(!missing.root.join("etc/hybridge/hybridge.toml").exists());
    assert!(!missing.calls.contains("systemctl"), "{}", missing.calls);

    // A certificate for another site: check-config stops it, naming both identities.
    let wrong = run_setup(
        &work,
        "wrong-site",
        Boot::DebAtBoot,
        &[
            (CA_ARN, ca),
            (NODE_ARN, node_secret(&pki.node("dc1", "cloud-1"))),
        ],
    );
    assert_ne!(wrong.code, 0);
    assert!(
        wrong.console.contains("hybridge-setup: FAILED:"),
        "{}",
        wrong.console
    );
    assert!(
        wrong.console.contains("site/dc1/node/cloud-1")
            && wrong.console.contains("site/aws/node/cloud-1"),
        "{}",
        wrong.console
    );
    assert!(
        !wrong.root.join("etc/hybridge").exists(),
        "half-configured node: {:?}",
        wrong.root
    );
    assert!(!wrong.calls.contains("systemctl"), "{}", wrong.calls);

    // From the VM image: nothing is downloaded or installed, the same checks and the same
    // order apply, and an image without the package says so instead of half-starting.
    let secrets = [
        (CA_ARN, std::fs::read_to_string(pki.path("ca.pem")).unwrap()),
        (NODE_ARN, node_secret(&pki.node("aws", "cloud-1"))),
    ];
    let image = run_setup(
        &work,
        "image",
        Boot::Image {
            package_installed: true,
        },
        &secrets,
    );
    assert_eq!(image.code, 0, "{}", image.console);
    assert!(
        image
            .console
            .contains("hybridge-setup: using hybridge 0.1.0-1 from the image"),
        "{}",
        image.console
    );
    assert!(image.root.join("etc/hybridge/node.key").exists());
    assert_eq!(
        image.calls.trim(),
        "systemctl enable --now hybridge.service",
        "the image path must install nothing"
    );
    let bare = run_setup(
        &work,
        "image-without-package",
        Boot::Image {
            package_installed: false,
        },
        &secrets,
    );
    assert_ne!(bare.code, 0);
    assert_eq!(
        bare.console.trim(),
        "hybridge-setup: FAILED: this image has no hybridge package: boot the hybridge VM image, or set deb_url"
    );
    assert!(!bare.root.join("etc/hybridge").exists());
    assert!(bare.calls.is_empty(), "{}", bare.calls);
}
