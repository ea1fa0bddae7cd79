//! The cloud VM image (`terraform/image`), built from this repository with the .deb of this
//! test build baked in, checked for what it must and must not carry, and booted under QEMU
//! the way a cloud instance boots: UEFI firmware, user data rendered from the Terraform
//! module's template on a NoCloud `cidata` seed, the module's set-up script, `hybridge
//! check-config`, then the unit. On-prem nodes on the host dial the VM through ports QEMU's
//! user networking forwards (the tunnel port for UDP and TCP: one node per carrier), and a
//! request goes host → VM → upstream inside the VM and back.
//!
//! The test's own additions to the user data ride in a second cloud-config part: a stand-in
//! `aws` answering for Secrets Manager, an upstream, and console markers it waits on. The
//! image is cached under `target/vm-image/KEY` (KEY: a hash of the image definition and of
//! what the .deb installs, docs left out), so a second run boots without building. Building needs root, mkosi 14 and the
//! Debian mirror; booting needs qemu-system-x86 and OVMF (all installed by .ci/run).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use hybridge::tunnel::connection::Carrier;
use hybridge_tests::*;
use sha2::{Digest, Sha256};

const TUNNEL_PORT: u16 = 7443;
const HEALTH_PORT: u16 = 7181;
const UPSTREAM: &str = "127.0.0.1:8080";
const CA_ARN: &str = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hybridge/ca-AbCdEf";
const NODE_ARN: &str =
    "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hybridge/node/cloud-1-AbCdEf";
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The image build: a cold package cache and a busy 2-core machine take ~2-4 minutes.
const BUILD_LIMIT: Duration = Duration::from_secs(900);

/// Writes a measurement where the person running the tests sees it (the test harness
/// captures `println!` of passing tests, not the stderr handle).
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "vm_image: {line}");
}

/// The built image's files.
struct Image {
    raw: PathBuf,
    qcow2: PathBuf,
    manifest: PathBuf,
    packages: PathBuf,
}

/// The cargo target dir this test runs from (target/PROFILE/deps/vm_image-HASH).
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(3)
        .unwrap()
        .to_owned()
}

/// Adds every file under `dir` that `wanted` accepts (by its path relative to `dir`) to
/// `hash`: path, mode and content, or the target of a symbolic link.
fn hash_tree(hash: &mut Sha256, dir: &Path, wanted: &dyn Fn(&Path) -> bool) {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                walk(&path, files);
            } else {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    files.sort();
    for file in files {
        let relative = file.strip_prefix(dir).unwrap();
        if !wanted(relative) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&file).unwrap();
        hash.update(relative.to_string_lossy().as_bytes());
        hash.update(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()).to_le_bytes());
        if meta.is_symlink() {
            hash.update(
                std::fs::read_link(&file)
                    .unwrap()
                    .to_string_lossy()
                    .as_bytes(),
            );
        } else {
            hash.update(std::fs::read(&file).unwrap());
        }
    }
}

/// A hash of everything the image is made from: the image definition and what the .deb
/// installs and runs, but not its documentation. The README rides in the .deb
/// (/usr/share/doc), and editing it must not rebuild the image.
fn image_key(deb: &Path) -> String {
    let unpacked = tempfile::tempdir().unwrap();
    let (files, scripts) = (
        unpacked.path().join("files"),
        unpacked.path().join("scripts"),
    );
    run_checked(
        Command::new("dpkg-deb")
            .arg("--extract")
            .arg(deb)
            .arg(&files),
    );
    run_checked(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(deb)
            .arg(&scripts),
    );
    let mut hash = Sha256::new();
    let not_docs = |path: &Path| path.extension().is_none_or(|e| e != "md");
    hash_tree(&mut hash, &repo_root().join("terraform/image"), &not_docs);
    hash_tree(&mut hash, &files, &|path| {
        !path.starts_with("usr/share/doc")
    });
    // `control` has the installed size and `md5sums` the README's checksum; the version and
    // the dependencies follow from the binaries.
    hash_tree(&mut hash, &scripts, &|path| {
        path != Path::new("control") && path != Path::new("md5sums")
    });
    hex::encode(&hash.finalize()[..8])
}

/// Runs `terraform/image/build` into `out`, its output into `log`; kills it and everything it
/// started (its own process group: mkosi, debootstrap, nspawn) once `limit` has passed.
fn build_image(deb: &Path, out: &Path, cache: &Path, log: &Path, limit: Duration) {
    let log_file = std::fs::File::create(log).unwrap();
    let mut build = Command::new(repo_root().join("terraform/image/build"))
        .arg("--deb")
        .arg(deb)
        .arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(cache)
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .expect("running terraform/image/build");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = build.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", build.id())])
                .status();
            let _ = build.wait();
            break None;
        }
        // A child's exit has no readiness signal to wait on without a pidfd.
        std::thread::sleep(Duration::from_millis(500));
    };
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    let tail = log_text.lines().rev().take(60).collect::<Vec<_>>();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    match status {
        Some(status) if status.success() => {}
        Some(status) => panic!(
            "terraform/image/build failed ({status}); the end of {}:\n{}",
            log.display(),
            tail.join("\n")
        ),
        None => panic!(
            "terraform/image/build took longer than {limit:?} and was killed; the end of {}:\n{}",
            log.display(),
            tail.join("\n")
        ),
    }
}

/// The image for this build's .deb: from the cache, or built by `terraform/image/build`.
/// The first test to ask builds it; a failed build fails every test that needs the image with
/// the same message instead of building again.
fn image() -> &'static Image {
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    let image = IMAGE.get_or_init(|| {
        std::panic::catch_unwind(cached_or_built_image).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        })
    });
    image
        .as_ref()
        .unwrap_or_else(|why| panic!("no VM image: {why}"))
}

/// Fails at once, naming what is missing, where the image can be neither built nor booted,
/// before the .deb is built.
fn check_prerequisites() {
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut missing: Vec<&str> = [
        "mkosi",
        "debootstrap",
        "systemd-nspawn",
        "mkfs.vfat",
        "mcopy",
        "mdir",
        "sfdisk",
        "objcopy",
        "debugfs",
        "dpkg-deb",
        "qemu-img",
        "qemu-system-x86_64",
        "genisoimage",
        "setpriv",
    ]
    .into_iter()
    .filter(|tool| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
    .collect();
    missing.extend(
        [OVMF_CODE, OVMF_VARS]
            .into_iter()
            .filter(|file| !Path::new(file).is_file()),
    );
    assert!(
        root && missing.is_empty(),
        "the VM image tests need root (building the image: debootstrap, systemd-nspawn){}; \
         run `terraform/image/install-deps` as root (.ci/run does)",
        if missing.is_empty() {
            String::new()
        } else {
            format!(" and {}", missing.join(", "))
        }
    );
}

/// The image from `target/vm-image/KEY`, built there first unless a complete one is there.
fn cached_or_built_image() -> Image {
    check_prerequisites();
    let base = target_dir().join("vm-image");
    std::fs::create_dir_all(&base).unwrap();
    let deb_dir = tempfile::tempdir().unwrap();
    let deb = build_deb(deb_dir.path());
    let key = image_key(&deb);
    let dir = base.join(&key);
    let image = Image {
        raw: dir.join("hybridge-image.raw"),
        qcow2: dir.join("hybridge-image.qcow2"),
        manifest: dir.join("hybridge-image.manifest.json"),
        packages: dir.join("hybridge-image.packages"),
    };
    let complete = dir.join("complete");
    if complete.exists() {
        report(&format!("reusing the image in {}", dir.display()));
        return image;
    }
    // Images of other inputs go (each is ~0.5 GB); the package cache stays.
    for entry in std::fs::read_dir(&base).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && path.file_name().is_some_and(|n| n != "apt-cache") {
            std::fs::remove_dir_all(&path).unwrap();
        }
    }
    std::fs::create_dir_all(&dir).unwrap();
    let started = Instant::now();
    build_image(
        &deb,
        &dir,
        &base.join("apt-cache"),
        &dir.join("build.log"),
        BUILD_LIMIT,
    );
    let built_in = started.elapsed();
    std::fs::write(&complete, format!("{built_in:?}\n")).unwrap();
    let used = |path: &Path| {
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap()) * 512
    };
    report(&format!(
        "built the image in {:.0} s: raw {} MiB ({} MiB allocated), qcow2 {} MiB",
        built_in.as_secs_f64(),
        std::fs::metadata(&image.raw).unwrap().len() >> 20,
        used(&image.raw) >> 20,
        std::fs::metadata(&image.qcow2).unwrap().len() >> 20,
    ));
    image
}

/// The root partition of the raw image, as a path debugfs opens (`FILE?offset=BYTES`).
fn root_partition(raw: &Path) -> String {
    let output = run_checked(Command::new("sfdisk").arg("--json").arg(raw));
    let table: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let table = &table["partitiontable"];
    assert_eq!(table["label"], "gpt");
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    let partitions = table["partitions"].as_array().unwrap();
    let types: Vec<&str> = partitions
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", // EFI system partition
            "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", // Linux root (x86-64)
        ]
    );
    format!(
        "{}?offset={}",
        raw.display(),
        partitions[1]["start"].as_u64().unwrap() * sector
    )
}

/// Runs one debugfs request against the image's root file system; returns its output.
fn debugfs(partition: &str, request: &str) -> String {
    let output = run_checked(Command::new("debugfs").args(["-R", request, partition]));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_image_carries_the_package_as_the_deb_ships_it_and_no_identity() {
    let image = image();
    let partition = root_partition(&image.raw);

    // The unit and the sysctl exactly as the .deb ships them, the unit enabled.
    for (in_image, in_repo) in [
        (
            "/usr/lib/systemd/system/hybridge.service",
            "systemd/hybridge.service",
        ),
        (
            "/usr/lib/sysctl.d/60-hybridge.conf",
            "systemd/hybridge.sysctl",
        ),
        (
            "/usr/lib/sysusers.d/hybridge.conf",
            "systemd/hybridge.sysusers",
        ),
    ] {
        assert_eq!(
            debugfs(&partition, &format!("cat {in_image}")),
            std::fs::read_to_string(repo_root().join(in_repo)).unwrap(),
            "{in_image}"
        );
    }
    let wants = debugfs(
        &partition,
        "stat /etc/systemd/system/multi-user.target.wants/hybridge.service",
    );
    // /lib is /usr/lib (merged /usr); systemctl names the unit's path by the former.
    assert!(
        wants.contains("Type: symlink")
            && (wants.contains("\"/lib/systemd/system/hybridge.service\"")
                || wants.contains("\"/usr/lib/systemd/system/hybridge.service\"")),
        "{wants}"
    );
    // No identity: an empty machine-id (made on first boot), no host keys (no sshd at all),
    // nothing in /etc/hybridge and no policy database until cloud-init configures the node,
    // no cloud-init state from the build.
    assert!(
        debugfs(&partition, "stat /etc/machine-id").contains("Size: 0"),
        "machine-id is not empty"
    );
    for folder in ["/etc/hybridge", "/var/lib/hybridge", "/etc/ssl/private"] {
        // `ls -p`: one "/inode/mode/uid/gid/name/size/" line per entry.
        let listing = debugfs(&partition, &format!("ls -p {folder}"));
        let names: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.split('/').nth(5))
            .filter(|name| *name != "." && *name != "..")
            .collect();
        assert!(names.is_empty(), "{folder} is not empty: {names:?}");
    }
    for absent in [
        "/etc/ssh",
        "/var/lib/cloud",
        "/var/lib/systemd/random-seed",
        "/usr/sbin/sshd",
    ] {
        let stat = Command::new("debugfs")
            .args(["-R", &format!("stat {absent}"), &partition])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&stat.stderr).contains("File not found"),
            "{absent} is in the image"
        );
    }
    // The package manifest: hybridge at this build's version, cloud-init, no SSH server.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&image.manifest).unwrap()).unwrap();
    let packages: Vec<(String, String)> = manifest["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let version = |name: &str| {
        packages
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        version("hybridge"),
        Some(format!("{}-1", env!("CARGO_PKG_VERSION")).as_str())
    );
    for wanted in [
        "cloud-init",
        "awscli",
        "jq",
        "linux-image-cloud-amd64",
        "systemd",
    ] {
        assert!(version(wanted).is_some(), "{wanted} is not in the image");
    }
    for unwanted in ["openssh-server", "openssh-client", "ifupdown"] {
        assert!(version(unwanted).is_none(), "{unwanted} is in the image");
    }
    let listed = std::fs::read_to_string(&image.packages).unwrap();
    assert_eq!(listed.lines().count(), packages.len());

    // The ESP holds the unified kernel image at the firmware's fallback path, and the qcow2
    // is the same disk.
    let esp = run_checked(
        Command::new("mdir")
            .arg("-b")
            .arg("-i")
            .arg(format!("{}@@1M", image.raw.display()))
            .arg("::/EFI/BOOT"),
    );
    assert_eq!(
        String::from_utf8_lossy(&esp.stdout).trim(),
        "::/EFI/BOOT/BOOTX64.EFI"
    );
    let info = run_checked(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&image.qcow2),
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(
        info["virtual-size"].as_u64(),
        Some(std::fs::metadata(&image.raw).unwrap().len())
    );
}

/// QEMU's accelerator and how long a boot may take with it. `/dev/kvm` alone is not enough:
/// a paravirtual KVM (kvm_pvm, as inside some microVMs) cannot run a guest's UEFI firmware,
/// so only hardware-assisted KVM is used; TCG otherwise. HYBRIDGE_VM_ACCEL=kvm|tcg forces one.
fn accelerator() -> (&'static str, Duration) {
    let kvm = ("kvm", Duration::from_secs(240));
    let tcg = ("tcg", Duration::from_secs(900));
    match std::env::var("HYBRIDGE_VM_ACCEL").as_deref() {
        Ok("kvm") => return kvm,
        Ok("tcg") => return tcg,
        _ => {}
    }
    let hardware = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"]
        .iter()
        .any(|m| Path::new(m).exists());
    if Path::new("/dev/kvm").exists() && hardware {
        kvm
    } else {
        tcg
    }
}

/// A VM booted from the image, its serial console read line by line; killed when dropped
/// (also when a test panics), and by the kernel when the test process dies without unwinding.
struct Vm {
    /// Dropped first: kills and reaps QEMU.
    qemu: ChildGuard,
    /// Keeps the thread QEMU was started from alive while the VM runs (see [`spawn_qemu`]).
    _spawner: mpsc::Sender<()>,
    qmp: PathBuf,
    started: Instant,
    accel: &'static str,
    limit: Duration,
    _dir: tempfile::TempDir,
}

/// Starts QEMU under `setpriv --pdeathsig KILL`, so that it dies with the test process even
/// when that is killed outright (a CI time-out) and no destructor runs. The parent-death
/// signal follows the thread that started the process, and tokio retires worker threads, so
/// QEMU is started from a thread of its own that lives until the returned sender is dropped.
fn spawn_qemu(arguments: Vec<String>) -> (ChildGuard, mpsc::Sender<()>) {
    let (started, qemu) = mpsc::channel();
    let (keep, kept) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "qemu-system-x86_64"])
            .args(arguments);
        let _ = started.send(ChildGuard::spawn(command));
        // Returns (with an error) once the VM drops its sender.
        let _ = kept.recv();
    });
    (qemu.recv().expect("starting QEMU"), keep)
}

/// The host ports QEMU forwards to the VM's tunnel (UDP and TCP) and health (TCP) ports.
#[derive(Clone, Copy)]
struct Forwards {
    tunnel: u16,
    health: u16,
}

impl Vm {
    /// Boots `image` (writes go to a throwaway overlay) with `user_data` on a NoCloud seed.
    fn boot(image: &Image, user_data: &str, instance: &str, forwards: Forwards) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        std::fs::write(seed.join("user-data"), user_data).unwrap();
        std::fs::write(
            seed.join("meta-data"),
            format!("instance-id: {instance}\nlocal-hostname: cloud-1\n"),
        )
        .unwrap();
        let iso = dir.path().join("seed.iso");
        run_checked(
            Command::new("genisoimage")
                .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
                .arg(&iso)
                .arg(seed.join("user-data"))
                .arg(seed.join("meta-data")),
        );
        let vars = dir.path().join("OVMF_VARS.fd");
        std::fs::copy(OVMF_VARS, &vars)
            .unwrap_or_else(|e| panic!("{OVMF_VARS}: {e} (ovmf is installed by .ci/run)"));
        let qmp = dir.path().join("qmp.sock");
        let (accel, limit) = accelerator();
        let mut arguments: Vec<String> = [
            "-machine",
            &format!("q35,accel={accel}"),
            "-cpu",
            if accel == "kvm" { "host" } else { "max" },
            "-smp",
            if accel == "kvm" { "2" } else { "1" },
            "-m",
            "1024",
        ]
        .map(String::from)
        .into();
        for drive in [
            format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
            format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
            format!(
                "file={},if=virtio,format=raw,snapshot=on",
                image.raw.display()
            ),
            format!("file={},if=virtio,format=raw,readonly=on", iso.display()),
        ] {
            arguments.extend(["-drive".to_owned(), drive]);
        }
        // The tunnel port is forwarded for both carriers (QUIC over UDP, TLS over TCP), on one
        // host port number as a load balancer would. Not restrict=on: libslirp then drops every
        // UDP datagram the guest sends (but DHCP and TFTP), also the replies on a forwarded UDP
        // port, so no QUIC handshake could complete. That the image installs nothing at boot
        // is shown by the set-up script's "from the image" line instead.
        arguments.extend([
            "-netdev".to_owned(),
            format!(
                "user,id=net0,hostfwd=udp:127.0.0.1:{tunnel}-:{TUNNEL_PORT},\
                 hostfwd=tcp:127.0.0.1:{tunnel}-:{TUNNEL_PORT},\
                 hostfwd=tcp:127.0.0.1:{}-:{HEALTH_PORT}",
                forwards.health,
                tunnel = forwards.tunnel,
            ),
        ]);
        arguments.extend(
            [
                "-device",
                "virtio-net-pci,netdev=net0",
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "stdio",
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp.display()),
                "-no-reboot",
            ]
            .map(String::from),
        );
        let started = Instant::now();
        let (qemu, spawner) = spawn_qemu(arguments);
        Self {
            qemu,
            _spawner: spawner,
            qmp,
            started,
            accel,
            limit,
            _dir: dir,
        }
    }

    /// Waits (bounded by the boot limit) for the console line the user data's last command
    /// prints once everything before it ran; returns the time since QEMU started.
    fn wait_until_done(&mut self) -> Duration {
        self.qemu
            .wait_for_line(self.limit, |line| marker(line) == Some("done"));
        self.started.elapsed()
    }

    /// Console lines so far.
    fn console(&mut self) -> Vec<String> {
        self.qemu.drain().to_vec()
    }

    /// What the user data's runcmd reported after the set-up script: (is-active of the unit,
    /// listening sockets as "proto address:port").
    fn markers(&mut self) -> (String, BTreeSet<String>) {
        let console = self.console();
        let mut active = String::new();
        let mut listening = BTreeSet::new();
        for line in console.iter().filter_map(|l| marker(l)) {
            if let Some(state) = line.strip_prefix("hybridge ") {
                active = state.to_owned();
            } else if let Some(socket) = line.strip_prefix("listening ") {
                let fields: Vec<&str> = socket.split_whitespace().collect();
                let (proto, local) = (fields[0], fields[4]);
                let port = local.rsplit(':').next().unwrap();
                // DHCP clients keep their reply port bound; they accept nothing else.
                if proto == "udp" && (port == "68" || port == "546") {
                    continue;
                }
                listening.insert(format!("{proto} {local}"));
            }
        }
        (active, listening)
    }

    /// Presses the ACPI power button (QMP) and waits for the guest to power off cleanly.
    fn power_down(&mut self) -> Duration {
        let asked = Instant::now();
        let stream = UnixStream::connect(&self.qmp).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("\"QMP\""), "QMP greeting: {line}");
        for command in ["qmp_capabilities", "system_powerdown"] {
            writeln!(writer, "{{\"execute\": \"{command}\"}}").unwrap();
            loop {
                line.clear();
                assert_ne!(reader.read_line(&mut line).unwrap(), 0, "QMP closed");
                assert!(!line.contains("\"error\""), "{command}: {line}");
                if line.contains("\"return\"") {
                    break;
                }
            }
        }
        let code = self.qemu.wait_exit(Duration::from_secs(180));
        let console = self.console();
        assert_eq!(
            code,
            Some(0),
            "the VM did not power off; console:\n{}",
            console.join("\n")
        );
        assert!(
            console.iter().any(|l| l.contains("reboot: Power down")),
            "no clean power-off on the console:\n{}",
            console.join("\n")
        );
        asked.elapsed()
    }
}

/// The text after `vm-test: ` on a console line (journald prefixes it with time and unit).
fn marker(line: &str) -> Option<&str> {
    line.split_once("vm-test: ")
        .map(|(_, rest)| rest.trim_end())
}

/// The user data the Terraform module gives node cloud-1 when booting the image (image_id
/// set, so main.tf passes an empty deb_url), exporting the VM's upstream as `inventory` to
/// site `onprem` and allowing `web` from that site to call it.
fn module_user_data() -> String {
    let toml = render_terraform_template(
        "hybridge.toml.tftpl",
        &serde_json::json!({
            "node_name": "cloud-1",
            "site": "cloud",
            "trust_domain": TRUST_DOMAIN,
            "config_dir": "/etc/hybridge",
            "data_dir": "/var/lib/hybridge",
            "tunnel_port": TUNNEL_PORT,
            "onprem_sites": ["onprem"],
            "announce": [],
            "with_crl": false,
            "exports": [{"name": "inventory", "endpoints": [UPSTREAM], "protocol": "http1"}],
            "imports": [],
        }),
    );
    let acl = "[[export]]\nservice = \"inventory\"\nsites = \"cloud\"\n\n\
               [[rule]]\nid = \"web-to-inventory\"\nsource = \"web\"\nsource_site = \"onprem\"\n\
               destination = \"inventory\"\naction = \"allow\"\n";
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    render_terraform_template(
        "cloud-init.yaml.tftpl",
        &serde_json::json!({
            "node_name": "cloud-1",
            "site": "cloud",
            "region": "eu-west-1",
            "deb_url": "",
            "ca_secret_arn": CA_ARN,
            "crl_secret_arn": "",
            "cert_secret_arn": NODE_ARN,
            "acl_b64": b64(acl),
            "hybridge_toml_b64": b64(&toml),
        }),
    )
}

/// The test's part of the user data, merged into the module's (lists appended): the `aws`
/// stand-in and its secrets, an upstream serving `page` as /hello.txt on 127.0.0.1:8080, and
/// runcmd lines after the set-up script that report the unit's state and every listening
/// socket to the console.
fn test_user_data(secrets: &[(&str, String)], page: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut part = String::from(
        "#cloud-config\n\
         merge_how:\n\
         \x20 - name: list\n\
         \x20   settings: [append]\n\
         \x20 - name: dict\n\
         \x20   settings: [no_replace, recurse_list]\n\
         write_files:\n",
    );
    let mut file = |path: &str, mode: &str, content: &str| {
        part += &format!(
            "  - path: {path}\n    permissions: \"{mode}\"\n    encoding: b64\n    content: {}\n",
            b64(content)
        );
    };
    file("/usr/local/bin/aws", "0755", AWS_SECRETS_STUB);
    for (arn, value) in secrets {
        file(
            &format!("/run/hybridge-test-secrets/{}", stub_secret_name(arn)),
            "0600",
            value,
        );
    }
    file("/srv/upstream/hello.txt", "0644", page);
    // The VM's own log of hybridge goes to the console too, so a failure shows both sides
    // (through /dev/console: the serial getty's vhangup cuts off writers of /dev/ttyS0).
    part += "bootcmd:\n\
             \x20 - [mkdir, -p, /srv/upstream]\n\
             \x20 - [systemd-run, --no-block, --unit=test-journal, sh, -c, \"journalctl -f -o cat -u hybridge.service | sed -u 's/^/vm-test: journal /' > /dev/console\"]\n\
             \x20 - [systemd-run, --no-block, --unit=test-upstream, python3, -m, http.server, --bind, 127.0.0.1, --directory, /srv/upstream, \"8080\"]\n\
             runcmd:\n\
             \x20 - 'echo \"vm-test: hybridge $(systemctl is-active hybridge.service)\"'\n\
             \x20 - \"ss -Hlntu | sed 's/^/vm-test: listening /'\"\n\
             \x20 - 'echo \"vm-test: done\"'\n";
    part
}

/// Two cloud-config parts in one MIME multipart document, as cloud-init merges them.
fn multipart(parts: &[String]) -> String {
    let boundary = "==hybridge-vm-test==";
    let mut document =
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n");
    for part in parts {
        document += &format!(
            "--{boundary}\nContent-Type: text/cloud-config; charset=\"utf-8\"\nMIME-Version: 1.0\n\n{part}\n"
        );
    }
    document + &format!("--{boundary}--\n")
}

fn node_secret(files: &NodeFiles) -> String {
    serde_json::json!({
        "cert": std::fs::read_to_string(&files.cert).unwrap(),
        "key": std::fs::read_to_string(&files.key).unwrap(),
    })
    .to_string()
}

/// A request to the VM (or through it) answered within a minute, even under TCG.
async fn bounded(request: impl std::future::Future<Output = Answer>) -> Answer {
    tokio::time::timeout(Duration::from_secs(60), request)
        .await
        .expect("no answer within 60 s")
}

fn ports() -> Forwards {
    let base = free_port_block();
    Forwards {
        tunnel: base,
        health: base + 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_boots_as_a_cloud_node_that_an_onprem_node_reaches_through_its_tunnel() {
    let image = tokio::task::block_in_place(image);
    let pki = Pki::new();
    // The temporary folder's random name makes the page this run's own.
    let page = format!("served inside the VM for {}\n", pki.dir.path().display());
    let user_data = multipart(&[
        module_user_data(),
        test_user_data(
            &[
                (CA_ARN, std::fs::read_to_string(pki.path("ca.pem")).unwrap()),
                (NODE_ARN, node_secret(&pki.node("cloud", "cloud-1"))),
            ],
            &page,
        ),
    ]);
    let forwards = ports();
    let mut vm = Vm::boot(image, &user_data, "iid-hybridge-good", forwards);
    let booted = tokio::task::block_in_place(|| vm.wait_until_done());

    // The module's set-up script ran from the image: nothing installed, config checked,
    // unit started; it is active and its ports (and the test's upstream) are all that listen.
    let console = vm.console();
    let setup: Vec<&String> = console
        .iter()
        .filter(|l| l.contains("hybridge-setup: "))
        .collect();
    assert!(
        setup.iter().any(|l| l.contains(&format!(
            "hybridge-setup: using hybridge {}-1 from the image",
            env!("CARGO_PKG_VERSION")
        ))) && setup
            .iter()
            .any(|l| l.contains("hybridge-setup: node cloud-1 is running"))
            && !setup.iter().any(|l| l.contains("FAILED")),
        "set-up did not run cleanly; console:\n{}",
        console.join("\n")
    );
    let (active, listening) = vm.markers();
    assert_eq!(active, "active", "console:\n{}", console.join("\n"));
    assert_eq!(
        listening,
        BTreeSet::from([
            format!("udp 0.0.0.0:{TUNNEL_PORT}"),
            format!("tcp 0.0.0.0:{TUNNEL_PORT}"),
            format!("tcp 0.0.0.0:{HEALTH_PORT}"),
            "tcp 127.0.0.1:7180".to_owned(),
            format!("tcp {UPSTREAM}"),
        ]),
        "only hybridge (and the test's upstream) may listen"
    );

    // The load balancer's health check, through the forwarded health port; like the NLB it
    // names the instance's own address (10.0.2.15 under QEMU's user networking) as Host.
    let health = SocketAddr::from(([127, 0, 0, 1], forwards.health));
    let host = format!("10.0.2.15:{HEALTH_PORT}");
    let ready = bounded(http1(
        health,
        "GET",
        "/readyz",
        &[("host", &host)],
        Bytes::new(),
    ))
    .await;
    assert_eq!(
        (ready.status, &ready.body[..]),
        (200, &b"ready\n"[..]),
        "a cloud node is ready as soon as it can accept tunnels, before anyone dials it"
    );

    // On-prem nodes on the host dial the VM's tunnel port, one with each carrier (QUIC over
    // the forwarded UDP port, TLS over the forwarded TCP port); web → inventory goes host →
    // VM → upstream in the VM and back over both.
    let tunnel = SocketAddr::from(([127, 0, 0, 1], forwards.tunnel));
    let mut onprem_nodes = Vec::new();
    for (name, transport, carrier) in [
        ("onprem-quic", "quic", Carrier::Quic),
        ("onprem-tcp", "tcp", Carrier::Tcp),
    ] {
        let mut options = NodeOptions::onprem(&pki, name, &[tunnel]);
        options.tunnel_extra = format!("transport = \"{transport}\"\n");
        options.imports.push(("inventory".into(), "web".into()));
        let onprem = options.start().await;
        allow(&onprem, "web", "inventory");
        onprem_nodes.push((name, carrier, onprem));
    }
    // Both dial at once; each gets the time a TCG guest may need to answer.
    let routed = futures_util::future::join_all(
        onprem_nodes
            .iter()
            .map(|(_, _, onprem)| onprem.wait_for_route("inventory", Duration::from_secs(120))),
    )
    .await;
    if routed.contains(&false) {
        let status: Vec<String> = onprem_nodes
            .iter()
            .map(|(name, _, onprem)| {
                format!(
                    "{name}: {}",
                    hybridge::admin::status::status_json(&onprem.state)["peers"]
                )
            })
            .collect();
        panic!(
            "no tunnel to the VM ({routed:?}):\n{}\nconsole:\n{}",
            status.join("\n"),
            vm.console().join("\n")
        );
    }
    for (name, carrier, onprem) in &onprem_nodes {
        let carriers: Vec<Carrier> = onprem
            .state
            .peers
            .links()
            .iter()
            .map(|link| link.connection.carrier())
            .collect();
        assert_eq!(carriers, [*carrier], "{name}");
        let answer = bounded(http1(
            import_addr(onprem, "inventory"),
            "GET",
            "/hello.txt",
            &[],
            Bytes::new(),
        ))
        .await;
        assert_eq!(answer.status, 200, "{name}: {:?}", answer.body);
        assert_eq!(answer.body, page.as_bytes(), "{name}");
        let missing = bounded(http1(
            import_addr(onprem, "inventory"),
            "GET",
            "/absent.txt",
            &[],
            Bytes::new(),
        ))
        .await;
        assert_eq!(
            missing.status, 404,
            "{name}: the upstream's answer passes through"
        );
    }
    let ready = bounded(http1(
        health,
        "GET",
        "/readyz",
        &[("host", &host)],
        Bytes::new(),
    ))
    .await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);

    let stopped = tokio::task::block_in_place(|| vm.power_down());
    report(&format!(
        "booted ({}) to hybridge active in {:.1} s; powered off in {:.1} s",
        vm.accel,
        booted.as_secs_f64(),
        stopped.as_secs_f64()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_certificate_the_image_says_why_once_and_starts_nothing() {
    let image = tokio::task::block_in_place(image);
    let pki = Pki::new();
    let user_data = multipart(&[
        module_user_data(),
        test_user_data(
            &[(CA_ARN, std::fs::read_to_string(pki.path("ca.pem")).unwrap())],
            "unused\n",
        ),
    ]);
    let mut vm = Vm::boot(image, &user_data, "iid-hybridge-no-cert", ports());
    let booted = tokio::task::block_in_place(|| vm.wait_until_done());

    let console = vm.console();
    let failed: Vec<&String> = console
        .iter()
        .filter(|l| l.contains("hybridge-setup: FAILED"))
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "one FAILED line; console:\n{}",
        console.join("\n")
    );
    assert!(
        failed[0].contains(&format!(
            "hybridge-setup: FAILED: cannot read secret {NODE_ARN} (certificate of node cloud-1): An error occurred (ResourceNotFoundException)"
        )),
        "{}",
        failed[0]
    );
    let (active, listening) = vm.markers();
    assert_eq!(active, "inactive", "console:\n{}", console.join("\n"));
    assert_eq!(
        listening,
        BTreeSet::from([format!("tcp {UPSTREAM}")]),
        "nothing of a half-configured node may listen"
    );
    let stopped = tokio::task::block_in_place(|| vm.power_down());
    report(&format!(
        "booted ({}) to the refused set-up in {:.1} s; powered off in {:.1} s",
        vm.accel,
        booted.as_secs_f64(),
        stopped.as_secs_f64()
    ));
}
