//! Every example configuration in deploy/ parses and passes validation.

use std::path::{Path, PathBuf};

fn tomls(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(dir);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    out.sort();
    out
}

#[test]
fn every_example_cloud_config_is_valid() {
    let files: Vec<PathBuf> =
        [tomls("cloud"), tomls("local").into_iter().filter(|p| p.ends_with("cloud.toml")).collect()].concat();
    assert!(files.len() >= 2, "{files:?}");
    for f in files {
        let cfg = kappa_cloud::config::CloudConfig::load(&f).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cfg.view_specs().unwrap().is_empty());
    }
}

#[test]
fn the_example_config_holds_the_reference_designs_views() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud/single-node.toml");
    let specs = kappa_cloud::config::CloudConfig::load(&f).unwrap().view_specs().unwrap();
    let names: Vec<String> = specs.iter().map(|s| s.id()).collect();
    assert_eq!(names, ["device_metrics@1", "user_sessions@1", "device_lifetime@1"]);
}

#[test]
fn every_example_edge_config_is_valid() {
    let files: Vec<PathBuf> =
        [tomls("edge"), tomls("local").into_iter().filter(|p| p.ends_with("edge.toml")).collect()].concat();
    assert!(files.len() >= 2, "{files:?}");
    for f in files {
        kappa_edge::config::EdgeConfig::load(&f).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn the_example_configs_ship_the_rules_the_alert_tests_score() {
    let tested =
        kappa_cloud::config::CloudConfig::from_toml(kappa_tests::alert_kit::RULES).unwrap().rule_specs().unwrap();
    for f in ["../deploy/cloud/single-node.toml", "../deploy/local/cloud.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        let shipped = kappa_cloud::config::CloudConfig::load(&path).unwrap().rule_specs().unwrap();
        assert_eq!(shipped, tested, "{f}");
    }
}

/// The gateway's systemd unit passes `systemd-analyze verify`, its offline
/// security review rates it well hardened, and the installer lays out the
/// binary, config, unit and a 0700 data directory (under a staging root),
/// and does not start a service whose config fails `config check`.
#[test]
fn the_gateway_unit_is_valid_hardened_and_installable() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo.join("deploy/edge/kappa-edge.service")).unwrap();
    // The wrapper stands in for the installed binary: the test binary's edge role.
    let wrapper = dir.path().join("kappa-edge");
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec {} edge \"$@\"\n", kappa_tests::harness::bin())).unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let staged = dir.path().join("kappa-edge.service");
    std::fs::write(&staged, unit.replace("/usr/local/bin/kappa-edge", wrapper.to_str().unwrap())).unwrap();

    let verify =
        std::process::Command::new("systemd-analyze").arg("verify").arg(&staged).output().expect("systemd-analyze");
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&staged)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for kappa-edge.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "the unit should be well hardened (exposure {level}, 0 best, 10 worst)");

    let root = dir.path().join("root");
    let out = std::process::Command::new(repo.join("deploy/edge/install.sh"))
        .arg("--root")
        .arg(&root)
        .arg(&wrapper)
        .output()
        .expect("install.sh");
    assert!(
        out.status.success(),
        "install.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &str| {
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}")).permissions(),
        ) & 0o777
    };
    assert_eq!(mode("var/lib/kappa-edge"), 0o700);
    assert_eq!(mode("etc/kappa-edge"), 0o750);
    assert_eq!(mode("etc/kappa-edge/gateway.toml"), 0o640);
    assert_eq!(mode("usr/local/bin/kappa-edge"), 0o755);
    assert_eq!(std::fs::read_to_string(root.join("etc/systemd/system/kappa-edge.service")).unwrap(), unit);
    // The placeholder config names the cloud's CA, which nothing installs:
    // the installer says so and does not start a service that cannot run.
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stderr.contains("forward.ca_file"), "config check names the missing CA: {stderr}");
    assert!(stdout.contains("Not started") && stdout.contains("systemctl start kappa-edge"), "{stdout}");
}

/// The agent's Debian package (deploy/edge/package-deb.sh): it carries the
/// stripped binary, the unit (which passes `systemd-analyze verify`), the
/// commented config as a conffile, and a system user; `kappa-edge config
/// check` runs from it; it installs with dpkg, and purging removes it.
#[test]
fn the_agent_package_installs_checks_and_purges() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let proc_bin = PathBuf::from(kappa_tests::harness::bin());
    let binary = proc_bin.parent().unwrap().join("kappa-edge");
    assert!(binary.is_file(), "{} is built with the tests (cargo test builds kappa-edge)", binary.display());
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("run");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };

    let (code, text) = run(std::process::Command::new(repo.join("deploy/edge/package-deb.sh"))
        .arg(&binary)
        .arg(dir.path().join("deb")));
    assert_eq!(code, Some(0), "package-deb.sh: {text}");
    let deb = PathBuf::from(text.lines().last().unwrap().trim());
    assert!(deb.is_file(), "{text}");

    let (_, info) = run(std::process::Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in ["Package: kappa-edge", "Depends: libc6, adduser, systemd", "conffiles", "postinst"] {
        assert!(info.contains(field), "{field} in:\n{info}");
    }
    let root = dir.path().join("root");
    let (code, text) = run(std::process::Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    assert_eq!(code, Some(0), "{text}");
    let packed = root.join("usr/bin/kappa-edge");
    let (_, sections) = run(std::process::Command::new("readelf").args(["-S", "-W"]).arg(&packed));
    for gone in [".symtab", ".debug_info", ".debug_line", ".debug_str"] {
        assert!(!sections.contains(gone), "the binary is stripped ({gone}):\n{sections}");
    }
    assert!(std::fs::metadata(&packed).unwrap().len() < std::fs::metadata(&binary).unwrap().len() / 2);

    // The unit as packaged, with its binary where this test unpacked it.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/kappa-edge.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/kappa-edge run --config /etc/kappa-edge/gateway.toml"), "{unit}");
    let staged = dir.path().join("kappa-edge.service");
    std::fs::write(&staged, unit.replace("/usr/bin/kappa-edge", packed.to_str().unwrap())).unwrap();
    let (code, text) = run(std::process::Command::new("systemd-analyze").arg("verify").arg(&staged));
    assert!(code == Some(0) && text.is_empty(), "systemd-analyze verify: {text}");

    // `config check` from the package: the shipped config names a CA file
    // nothing installs, which it says; a config with the CA in place passes.
    let shipped = root.join("etc/kappa-edge/gateway.toml");
    let (code, text) = run(std::process::Command::new(&packed).args(["config", "check", "--config"]).arg(&shipped));
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("forward.ca_file"), "{text}");
    let ca = dir.path().join("cloud-ca.pem");
    let (code, text) =
        run(std::process::Command::new(&proc_bin).args(["cloud", "pki", "init", "--dir"]).arg(dir.path().join("pki")));
    assert_eq!(code, Some(0), "{text}");
    std::fs::copy(dir.path().join("pki/ca.pem"), &ca).unwrap();
    let edited = std::fs::read_to_string(&shipped)
        .unwrap()
        .replace("/etc/kappa-edge/cloud-ca.pem", ca.to_str().unwrap())
        .replace("/var/lib/kappa-edge", dir.path().join("data").to_str().unwrap());
    let edited_path = dir.path().join("gateway.toml");
    std::fs::write(&edited_path, edited).unwrap();
    let (code, text) = run(std::process::Command::new(&packed).args(["config", "check", "--config"]).arg(&edited_path));
    assert_eq!(code, Some(0), "{text}");

    // Installed for real with dpkg (no systemd runs here: the scripts leave
    // the service alone), then purged.
    let (code, text) = run(std::process::Command::new("dpkg").arg("-i").arg(&deb));
    assert_eq!(code, Some(0), "dpkg -i: {text}");
    let (code, text) = run(std::process::Command::new("/usr/bin/kappa-edge").arg("--version"));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("kappa-edge"), "{text}");
    let (code, text) = run(std::process::Command::new("getent").args(["passwd", "kappa-edge"]));
    assert_eq!(code, Some(0), "the package made its user: {text}");
    let meta = std::fs::metadata("/etc/kappa-edge/gateway.toml").unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o640);
    let (code, text) = run(std::process::Command::new("dpkg").args(["--purge", "kappa-edge"]));
    assert_eq!(code, Some(0), "dpkg --purge: {text}");
    assert!(!Path::new("/usr/bin/kappa-edge").exists() && !Path::new("/etc/kappa-edge").exists());
}
