//! Who a device is, and what it may do (docs/security.md, "Devices").
//!
//! With `[mqtt.access]` or `[mqtt.tls]`, a device must prove an identity at
//! CONNECT: the subject common name of its client certificate (the client id
//! must be the same), or username = client id with a password from
//! `access.password_file` (Mosquitto's `$7$` format, re-read when the file
//! changes), or, only with `access.anonymous = true`, its client id. A
//! device may then publish only to its own telemetry topic. Without either
//! section the listener is open: any client may publish to any device's
//! telemetry topic (development and trusted networks only).
//!
//! Password checks (PBKDF2, up to a million iterations in a hostile file)
//! run on the blocking pool, a few at a time, never on the async runtime.
//! An unknown device and a wrong password get the same answer after the
//! same work, so the answer does not tell which device ids exist.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Semaphore;

use super::close::Refusal;
use super::codec::Connect;

/// How many password checks may run at once.
const CONCURRENT_PASSWORD_CHECKS: usize = 2;

/// What `[mqtt.access]` (and `[mqtt.tls]`) demand of devices.
#[derive(Debug, Clone, Default)]
pub struct AccessSettings {
    /// Clients with neither certificate nor login connect as their client id.
    pub anonymous: bool,
    /// Mosquitto-format password file: device id → `$7$` hash.
    pub password_file: Option<PathBuf>,
    /// Device ids refused whatever credential they present.
    pub revoked: HashSet<String>,
}

/// The identity checks of a locked-down listener.
#[derive(Debug)]
pub struct Access {
    settings: AccessSettings,
    passwords: Mutex<Passwords>,
    hashing: Semaphore,
}

/// The password file as last read, and the modification time it had then.
#[derive(Debug, Default)]
struct Passwords {
    modified: Option<SystemTime>,
    logins: BTreeMap<String, String>,
}

impl Passwords {
    /// A hash of the same cost as the file's, to check unknown logins
    /// against so that they take as long as known ones.
    fn decoy(&self) -> String {
        self.logins.values().next().cloned().unwrap_or_else(|| crate::mosquitto::hash_password("", b"kappa-decoy!"))
    }
}

impl Access {
    /// Reads the password file, if any; an unreadable one is a startup error.
    pub fn new(settings: AccessSettings) -> Result<Arc<Self>, String> {
        let mut passwords = Passwords::default();
        if let Some(path) = &settings.password_file {
            passwords.logins =
                crate::mosquitto::read_password_file(path).map_err(|e| format!("mqtt.access.password_file {e}"))?;
            passwords.modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        }
        Ok(Arc::new(Self {
            settings,
            passwords: Mutex::new(passwords),
            hashing: Semaphore::new(CONCURRENT_PASSWORD_CHECKS),
        }))
    }

    /// Who the device is (its device id), or why it is refused.
    pub async fn identify(self: &Arc<Self>, c: &Connect, cert_name: Option<&str>) -> Result<String, Refusal> {
        let id = match (cert_name, &c.username) {
            (Some(name), _) => {
                if c.client_id != name {
                    return Err(Refusal::ClientIdMismatch);
                }
                name.to_string()
            }
            (None, Some(user)) if self.settings.password_file.is_some() => {
                if c.client_id != *user {
                    return Err(Refusal::ClientIdMismatch);
                }
                let password = c.password.clone().unwrap_or_default();
                self.check_password(user.clone(), password).await?;
                user.clone()
            }
            (None, _) if self.settings.anonymous => c.client_id.clone(),
            (None, Some(_)) => return Err(Refusal::UnknownDevice),
            (None, None) => return Err(Refusal::NoIdentity),
        };
        if kappa_common::reading::validate_device_id(&id).is_err() {
            return Err(Refusal::BadClientId);
        }
        if self.settings.revoked.contains(&id) {
            return Err(Refusal::Revoked);
        }
        Ok(id)
    }

    /// Checks `password` against `user`'s hash on the blocking pool.
    async fn check_password(self: &Arc<Self>, user: String, password: String) -> Result<(), Refusal> {
        let _permit = self.hashing.acquire().await.map_err(|_| Refusal::ServerBusy)?;
        let access = self.clone();
        tokio::task::spawn_blocking(move || {
            let (hash, known) = match access.password_hash(&user) {
                Some(hash) => (hash, true),
                None => (access.lock().decoy(), false),
            };
            match (known, crate::mosquitto::verify_password(&hash, password.as_bytes())) {
                (true, true) => Ok(()),
                (true, false) => Err(Refusal::BadPassword),
                (false, _) => Err(Refusal::UnknownDevice),
            }
        })
        .await
        .map_err(|_| Refusal::ServerBusy)?
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Passwords> {
        self.passwords.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device's hash from the password file, re-read if it changed.
    fn password_hash(&self, user: &str) -> Option<String> {
        let path = self.settings.password_file.as_ref()?;
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut p = self.lock();
        if modified != p.modified {
            match crate::mosquitto::read_password_file(path) {
                Ok(logins) => {
                    tracing::info!(file = %path.display(), logins = logins.len(), "Re-read the device password file.");
                    *p = Passwords { modified, logins };
                }
                Err(e) => tracing::error!(error = %e, "Cannot re-read the device password file; keeping the last one."),
            }
        }
        p.logins.get(user).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::Version;

    fn connect(id: &str, login: Option<(&str, &str)>) -> Connect {
        Connect {
            version: Version::V4,
            client_id: id.into(),
            clean: true,
            keep_alive: 30,
            username: login.map(|l| l.0.into()),
            password: login.map(|l| l.1.into()),
            will: None,
            session_expiry: 0,
        }
    }

    fn with_passwords(dir: &std::path::Path, anonymous: bool) -> Arc<Access> {
        let file = dir.join("passwd");
        let hash = crate::mosquitto::hash_password("right", b"0123456789ab");
        std::fs::write(&file, format!("dev-1:{hash}\ndev-2:{hash}\n")).unwrap();
        Access::new(AccessSettings {
            anonymous,
            password_file: Some(file),
            revoked: HashSet::from(["dev-2".to_string()]),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn devices_are_identified_by_login_certificate_or_client_id() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_passwords(dir.path(), false);
        assert_eq!(a.identify(&connect("dev-1", Some(("dev-1", "right"))), None).await, Ok("dev-1".into()));
        assert_eq!(a.identify(&connect("dev-1", None), Some("dev-1")).await, Ok("dev-1".into()));
        assert_eq!(a.identify(&connect("dev-1", None), Some("dev-9")).await, Err(Refusal::ClientIdMismatch));
        assert_eq!(a.identify(&connect("dev-9", Some(("dev-1", "right"))), None).await, Err(Refusal::ClientIdMismatch));
        assert_eq!(a.identify(&connect("dev-1", None), None).await, Err(Refusal::NoIdentity));
        assert_eq!(a.identify(&connect("dev-2", Some(("dev-2", "right"))), None).await, Err(Refusal::Revoked));
        let open = with_passwords(dir.path(), true);
        assert_eq!(open.identify(&connect("dev-7", None), None).await, Ok("dev-7".into()));
        assert_eq!(open.identify(&connect("bad id!", None), None).await, Err(Refusal::BadClientId));
    }

    #[tokio::test]
    async fn an_unknown_device_and_a_wrong_password_get_the_same_answer() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_passwords(dir.path(), false);
        let wrong = a.identify(&connect("dev-1", Some(("dev-1", "guess"))), None).await.unwrap_err();
        let unknown = a.identify(&connect("dev-9", Some(("dev-9", "right"))), None).await.unwrap_err();
        // Counted apart, answered alike.
        assert_eq!((wrong, unknown), (Refusal::BadPassword, Refusal::UnknownDevice));
        assert_eq!(wrong.code(), unknown.code());
    }

    #[tokio::test]
    async fn a_changed_password_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_passwords(dir.path(), false);
        let file = dir.path().join("passwd");
        let hash = crate::mosquitto::hash_password("new", b"0123456789ab");
        // A different length, so the change shows even within the mtime's resolution.
        std::fs::write(&file, format!("dev-3:{hash}\n")).unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(later).unwrap();
        assert_eq!(a.identify(&connect("dev-3", Some(("dev-3", "new"))), None).await, Ok("dev-3".into()));
        assert_eq!(a.identify(&connect("dev-1", Some(("dev-1", "right"))), None).await, Err(Refusal::UnknownDevice));
    }
}
