//! `kappa-edge mosquitto credentials`: the password and ACL files that lock
//! a Mosquitto broker down for a fleet (docs/edge.md, "A locked-down
//! Mosquitto").
//!
//! * `kappa.passwd`: one login per device and one for the agent, each a
//!   random password hashed the way `mosquitto_passwd` does in Mosquitto 2
//!   (`$7$`: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt). Existing
//!   logins in the file are kept as they are, so adding devices does not
//!   change anyone else's password. Mode 0640 and the broker's group
//!   (Mosquitto drops root privileges to its own user before reading it),
//!   or 0600 for a broker running as the file's owner.
//! * `kappa.acl`: deny by default; the agent reads every telemetry topic,
//!   each device may only write its own (`pattern write .../%u/telemetry`).
//! * `new-credentials.csv` (`login,password`, mode 0600): the passwords just
//!   created, for provisioning. They are stored nowhere else.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use base64::Engine;

/// Mosquitto 2's default PBKDF2 iteration count for `$7$` hashes.
const ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;

/// Why the files could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

/// The files written and the logins created now.
#[derive(Debug)]
pub struct Written {
    pub passwd: PathBuf,
    pub acl: PathBuf,
    /// `None` when every login existed already.
    pub new_credentials: Option<PathBuf>,
    pub created: Vec<String>,
    pub kept: usize,
}

/// A Mosquitto `$7$` password hash of `password` with `salt`.
pub fn hash_password(password: &str, salt: &[u8]) -> String {
    let mut out = [0u8; HASH_LEN];
    let iterations = NonZeroU32::new(ITERATIONS).unwrap_or(NonZeroU32::MIN);
    aws_lc_rs::pbkdf2::derive(aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA512, iterations, salt, password.as_bytes(), &mut out);
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("$7${ITERATIONS}${}${}", b64.encode(salt), b64.encode(out))
}

/// Whether `password` matches a `$7$` hash (constant-time comparison).
/// Anything but a well-formed `$7$` hash matches nothing.
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut parts = hash.split('$');
    let (Some(""), Some("7"), Some(iterations), Some(salt), Some(expected), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Some(iterations), Ok(salt), Ok(expected)) =
        (iterations.parse().ok().and_then(NonZeroU32::new), b64.decode(salt), b64.decode(expected))
    else {
        return false;
    };
    // Mosquitto's own limit; a higher count in a tampered file would only cost CPU.
    if iterations.get() > 1_000_000 || expected.is_empty() {
        return false;
    }
    aws_lc_rs::pbkdf2::verify(aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA512, iterations, &salt, password, &expected).is_ok()
}

/// The logins of a Mosquitto password file: user → hash.
pub fn read_password_file(path: &Path) -> Result<BTreeMap<String, String>, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Io { path: path.into(), source })?;
    let mut logins = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| CredentialsError::Invalid(format!("{} line {}: not user:hash", path.display(), i + 1)))?;
        logins.insert(user.to_string(), hash.to_string());
    }
    Ok(logins)
}

fn random(len: usize) -> Result<Vec<u8>, CredentialsError> {
    let mut bytes = vec![0u8; len];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| CredentialsError::Invalid("no randomness from the system".into()))?;
    Ok(bytes)
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), CredentialsError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| CredentialsError::Io { path: path.to_path_buf(), source };
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io)?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The id of the group named `name` (from `/etc/group`).
pub fn group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
    })
}

/// Writes the files into `dir` for `agent` and `devices`; telemetry topics
/// are `{topic_prefix}devices/{device}/telemetry`. With `group` (a gid), the
/// password file is 0640 and belongs to that group; without, 0600.
pub fn write_credentials(
    dir: &Path,
    agent: &str,
    devices: &[String],
    topic_prefix: &str,
    group: Option<u32>,
) -> Result<Written, CredentialsError> {
    let mut problems = Vec::new();
    for login in std::iter::once(agent).chain(devices.iter().map(String::as_str)) {
        if let Err(e) = kappa_common::reading::validate_device_id(login) {
            problems.push(format!("{login:?}: {e}"));
        }
    }
    if topic_prefix.contains(['+', '#']) {
        problems.push(format!("--topic-prefix {topic_prefix:?}: must not contain MQTT wildcards"));
    }
    if !problems.is_empty() {
        return Err(CredentialsError::Invalid(problems.join("\n")));
    }
    std::fs::create_dir_all(dir).map_err(|source| CredentialsError::Io { path: dir.to_path_buf(), source })?;
    let passwd = dir.join("kappa.passwd");
    let mut logins = match read_password_file(&passwd) {
        Err(CredentialsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        other => other?,
    };
    let kept = logins.len();
    let mut created = Vec::new();
    let mut csv = String::from("login,password\n");
    for login in std::iter::once(agent).chain(devices.iter().map(String::as_str)) {
        if logins.contains_key(login) {
            continue;
        }
        let password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random(24)?);
        logins.insert(login.to_string(), hash_password(&password, &random(SALT_LEN)?));
        csv.push_str(&format!("{login},{password}\n"));
        created.push(login.to_string());
    }
    let text: String = logins.iter().map(|(u, h)| format!("{u}:{h}\n")).collect();
    write(&passwd, &text, if group.is_some() { 0o640 } else { 0o600 })?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(&passwd, None, Some(gid)).map_err(|e| {
            CredentialsError::Invalid(format!(
                "{}: cannot give it to group {gid} ({e}); run as root, or pass --group \"\" for an owner-only file",
                passwd.display()
            ))
        })?;
    }
    let acl = dir.join("kappa.acl");
    write(
        &acl,
        &format!(
            "# Written by kappa-edge mosquitto credentials. Deny by default:\n\
             # the agent reads every device's telemetry, a device writes only its own.\n\
             user {agent}\ntopic read {topic_prefix}devices/+/telemetry\n\n\
             pattern write {topic_prefix}devices/%u/telemetry\n"
        ),
        0o644,
    )?;
    let new_credentials = if created.is_empty() {
        None
    } else {
        let path = dir.join("new-credentials.csv");
        write(&path, &csv, 0o600)?;
        Some(path)
    };
    Ok(Written { passwd, acl, new_credentials, created, kept })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_mosquitto_passwd() {
        // Made by `mosquitto_passwd -c -b FILE alice secret` (Mosquitto 2.0.11).
        let line = "$7$101$R3vTYYAl426m56uI$7DgBGjq804RfwPWezy+eWQbZhc4OazrwGC7nIumCXvBdT9T//+52/6Jdkk84iwvp1KPvi6W7EpJsj2rMd1j0Mg==";
        let salt = base64::engine::general_purpose::STANDARD.decode("R3vTYYAl426m56uI").unwrap();
        assert_eq!(hash_password("secret", &salt), line);
        assert_ne!(hash_password("Secret", &salt), line);
        assert!(verify_password(line, b"secret"));
        assert!(!verify_password(line, b"Secret"));
        for bad in ["", "$6$101$R3vT$abc", "$7$0$R3vTYYAl426m56uI$7DgB", "$7$101$!!$!!", "plain"] {
            assert!(!verify_password(bad, b"secret"), "{bad:?}");
        }
    }

    #[test]
    fn adding_devices_keeps_existing_logins_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_credentials(dir.path(), "kappa-edge", &["dev-a".into()], "", None).unwrap();
        assert_eq!(first.created, ["kappa-edge", "dev-a"]);
        let before = std::fs::read_to_string(&first.passwd).unwrap();
        let second =
            write_credentials(dir.path(), "kappa-edge", &["dev-a".into(), "dev-b".into()], "site1/", None).unwrap();
        assert_eq!((second.created.as_slice(), second.kept), (["dev-b".to_string()].as_slice(), 2));
        let after = std::fs::read_to_string(&second.passwd).unwrap();
        for line in before.lines() {
            assert!(after.contains(line), "an existing login changed");
        }
        let csv = std::fs::read_to_string(second.new_credentials.unwrap()).unwrap();
        assert!(csv.starts_with("login,password\ndev-b,") && !csv.contains("dev-a"));
        let acl = std::fs::read_to_string(&second.acl).unwrap();
        assert!(
            acl.contains("topic read site1/devices/+/telemetry")
                && acl.contains("pattern write site1/devices/%u/telemetry")
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&second.passwd).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_credentials(dir.path(), "kappa-edge", &["a:b".into()], "", None).is_err());
        assert!(write_credentials(dir.path(), "kappa-edge", &[], "x/#/", None).is_err());
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-kappa"), None);
    }
}
