//! `weft tls ca create` and `weft tls cert create`: the operator's CA and the
//! TLS certificates of servers and clients, like Consul's `consul tls`. They
//! run locally and contact no server.
//!
//! Files: `weft-ca.pem` and `weft-ca-key.pem`; `<dc>-server-weft-<n>.pem` and
//! `<dc>-server-weft-<n>-key.pem` (`client` for client certificates), `<n>`
//! the first number not taken yet. Keys are created with mode 0600,
//! certificates 0644 (less what the umask removes); existing files are never
//! overwritten.
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clap::{ArgGroup, Args, Subcommand};
use serde_json::json;
use weft_api::tls_certs::{self, CertPair, TlsCertError, MAX_DAYS};

use crate::{Format, Outcome};

const CA_CERT_FILE: &str = "weft-ca.pem";
const CA_KEY_FILE: &str = "weft-ca-key.pem";
const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;

#[derive(Subcommand)]
pub enum TlsCmd {
    /// The CA that signs the servers' and clients' TLS certificates.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Server and client certificates, signed by the CA.
    #[command(subcommand)]
    Cert(CertCmd),
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Create a CA: weft-ca.pem and weft-ca-key.pem (mode 0600) in --dir.
    Create(CaCreate),
}

#[derive(Args)]
pub struct CaCreate {
    /// Directory to write the files to (it must exist).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Days the CA is valid.
    #[arg(long, default_value_t = 1825, value_parser = days())]
    days: u32,
    /// The CA's common name.
    #[arg(long, default_value = "weft CA")]
    common_name: String,
}

#[derive(Subcommand)]
pub enum CertCmd {
    /// Create a server certificate (SAN server.<dc>.weft, localhost,
    /// 127.0.0.1, ::1) or a client certificate (client.<dc>.weft) and its key.
    Create(CertCreate),
}

#[derive(Args)]
#[command(group(ArgGroup::new("kind").required(true).args(["server", "client"])))]
pub struct CertCreate {
    /// A server certificate: serverAuth and clientAuth.
    #[arg(long)]
    server: bool,
    /// A client certificate: clientAuth only.
    #[arg(long)]
    client: bool,
    /// The datacenter whose name the certificate carries.
    #[arg(long, default_value = "dc1")]
    dc: String,
    /// The CA certificate.
    #[arg(long, default_value = CA_CERT_FILE)]
    ca: PathBuf,
    /// The CA's private key.
    #[arg(long, default_value = CA_KEY_FILE)]
    key: PathBuf,
    /// Directory to write the files to (it must exist).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365, value_parser = days())]
    days: u32,
    /// Another DNS name for a server certificate (repeatable).
    #[arg(
        long = "additional-dnsname",
        value_name = "NAME",
        conflicts_with = "client"
    )]
    additional_dnsname: Vec<String>,
    /// Another IP address for a server certificate (repeatable).
    #[arg(
        long = "additional-ipaddress",
        value_name = "IP",
        conflicts_with = "client"
    )]
    additional_ipaddress: Vec<IpAddr>,
}

fn days() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(MAX_DAYS))
}

pub fn run(cmd: TlsCmd, format: Format) -> anyhow::Result<Outcome> {
    let (cert, key) = match cmd {
        TlsCmd::Ca(CaCmd::Create(args)) => ca_create(&args)?,
        TlsCmd::Cert(CertCmd::Create(args)) => cert_create(&args)?,
    };
    match format {
        Format::Table => {
            println!("created {}", cert.display());
            println!("created {}", key.display());
        }
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "cert": cert.display().to_string(),
                "key": key.display().to_string(),
            }))?
        ),
    }
    Ok(Outcome::Ok)
}

fn ca_create(args: &CaCreate) -> anyhow::Result<(PathBuf, PathBuf)> {
    check_dir(&args.dir)?;
    let cert = in_dir(&args.dir, CA_CERT_FILE);
    let key = in_dir(&args.dir, CA_KEY_FILE);
    for path in [&cert, &key] {
        if exists(path)? {
            return Err(anyhow!(
                "{}: already exists; not overwriting it (choose another --dir)",
                path.display()
            ));
        }
    }
    let pair =
        tls_certs::create_ca(&args.common_name, args.days).map_err(|e| flag(e, &cert, &key))?;
    write_pair(&pair, &cert, &key)?;
    Ok((cert, key))
}

fn cert_create(args: &CertCreate) -> anyhow::Result<(PathBuf, PathBuf)> {
    check_dir(&args.dir)?;
    let ca = CertPair {
        cert_pem: read(&args.ca, "--ca")?,
        key_pem: read(&args.key, "--key")?,
    };
    let (pair, kind) = if args.server {
        let pair = tls_certs::create_server_cert(
            &ca,
            &args.dc,
            &args.additional_dnsname,
            &args.additional_ipaddress,
            args.days,
        );
        (pair, "server")
    } else {
        (
            tls_certs::create_client_cert(&ca, &args.dc, args.days),
            "client",
        )
    };
    let pair = pair.map_err(|e| flag(e, &args.ca, &args.key))?;
    let base = format!("{}-{kind}-weft", args.dc);
    for n in 0u32.. {
        let cert = in_dir(&args.dir, &format!("{base}-{n}.pem"));
        let key = in_dir(&args.dir, &format!("{base}-{n}-key.pem"));
        if exists(&cert)? || exists(&key)? {
            continue;
        }
        match write_pair(&pair, &cert, &key) {
            Ok(()) => return Ok((cert, key)),
            // Taken meanwhile (another `weft tls cert create`): next number.
            Err(e) if is_already_exists(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(anyhow!("{}: no free file number", args.dir.display()))
}

fn check_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(anyhow!("--dir {}: not a directory", dir.display())),
        Err(e) => Err(anyhow::Error::new(e).context(format!("--dir {}", dir.display()))),
    }
}

/// `dir/name`, or just `name` in the current directory.
fn in_dir(dir: &Path, name: &str) -> PathBuf {
    if dir == Path::new(".") {
        PathBuf::from(name)
    } else {
        dir.join(name)
    }
}

/// The error with the flag (and file) it is about in front.
fn flag(e: TlsCertError, ca: &Path, key: &Path) -> anyhow::Error {
    let what = match &e {
        TlsCertError::Datacenter { .. } => "--dc".to_string(),
        TlsCertError::Days(_) => "--days".to_string(),
        TlsCertError::CommonName(_) => "--common-name".to_string(),
        TlsCertError::DnsName { .. } => "--additional-dnsname".to_string(),
        TlsCertError::CaCert(_) => format!("--ca {}", ca.display()),
        TlsCertError::CaKey(_) | TlsCertError::KeyMismatch => format!("--key {}", key.display()),
        _ => return e.into(),
    };
    anyhow::Error::new(e).context(what)
}

fn read(path: &Path, flag: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
}

fn exists(path: &Path) -> anyhow::Result<bool> {
    path.try_exists()
        .with_context(|| format!("{}: cannot check whether it exists", path.display()))
}

fn is_already_exists(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == ErrorKind::AlreadyExists)
    })
}

/// Writes the key (0600), then the certificate (0644), both new files; if
/// the second cannot be written, the first is removed again.
fn write_pair(pair: &CertPair, cert: &Path, key: &Path) -> anyhow::Result<()> {
    write_new(key, &pair.key_pem, KEY_MODE)?;
    if let Err(e) = write_new(cert, &pair.cert_pem, CERT_MODE) {
        let _ = std::fs::remove_file(key);
        return Err(e);
    }
    Ok(())
}

/// Creates `path` with `mode` from the start (O_CREAT | O_EXCL: never an
/// existing file, and never more open than `mode`, whatever the umask) and
/// writes `text` to it. A file left half-written is removed.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            let note = if e.kind() == ErrorKind::AlreadyExists {
                ": already exists; not overwriting it"
            } else {
                ""
            };
            anyhow::Error::new(e).context(format!("{}{note}", path.display()))
        })?;
    if let Err(e) = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
    {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(anyhow::Error::new(e).context(format!("{}: cannot write", path.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn write_new_sets_the_mode_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        write_new(&key, "secret", KEY_MODE).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "secret");
        let err = write_new(&key, "other", KEY_MODE).unwrap_err();
        assert!(is_already_exists(&err));
        let text = crate::one_line(&err);
        assert!(text.contains("k.pem: already exists"), "{text}");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "secret");
        let missing = dir.path().join("no/such/dir.pem");
        let text = crate::one_line(&write_new(&missing, "x", CERT_MODE).unwrap_err());
        assert!(text.contains("no/such/dir.pem"), "{text}");
    }

    #[test]
    fn ca_then_numbered_server_and_client_certs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let ca_args = CaCreate {
            dir: d.clone(),
            days: 30,
            common_name: "weft CA".into(),
        };
        let (ca_cert, ca_key) = ca_create(&ca_args).unwrap();
        assert_eq!(ca_cert, d.join("weft-ca.pem"));
        assert_eq!(ca_key, d.join("weft-ca-key.pem"));
        assert_eq!(mode(&ca_key), 0o600);
        let text = crate::one_line(&ca_create(&ca_args).unwrap_err());
        assert!(text.contains("weft-ca.pem: already exists"), "{text}");

        let args = |server: bool| CertCreate {
            server,
            client: !server,
            dc: "dc1".into(),
            ca: ca_cert.clone(),
            key: ca_key.clone(),
            dir: d.clone(),
            days: 10,
            additional_dnsname: vec![],
            additional_ipaddress: vec![],
        };
        let (c0, k0) = cert_create(&args(true)).unwrap();
        assert_eq!(c0, d.join("dc1-server-weft-0.pem"));
        assert_eq!(k0, d.join("dc1-server-weft-0-key.pem"));
        assert_eq!(mode(&k0), 0o600);
        // A stray key file takes number 1 too.
        std::fs::write(d.join("dc1-server-weft-1-key.pem"), "").unwrap();
        let (c2, _) = cert_create(&args(true)).unwrap();
        assert_eq!(c2, d.join("dc1-server-weft-2.pem"));
        let (c, k) = cert_create(&args(false)).unwrap();
        assert_eq!(c, d.join("dc1-client-weft-0.pem"));
        assert_eq!(k, d.join("dc1-client-weft-0-key.pem"));

        // Errors name the flag and file.
        let mut bad = args(true);
        bad.key = c0.clone();
        let text = crate::one_line(&cert_create(&bad).unwrap_err());
        assert!(
            text.starts_with(&format!("--key {}", c0.display())),
            "{text}"
        );
        let mut bad = args(true);
        bad.key = k0.clone();
        let text = crate::one_line(&cert_create(&bad).unwrap_err());
        assert!(text.contains("does not match"), "{text}");
        let mut bad = args(true);
        bad.ca = d.join("missing.pem");
        let text = crate::one_line(&cert_create(&bad).unwrap_err());
        assert!(
            text.starts_with("--ca ") && text.contains("missing.pem"),
            "{text}"
        );
        let mut bad = args(true);
        bad.dc = "DC1".into();
        let text = crate::one_line(&cert_create(&bad).unwrap_err());
        assert!(text.starts_with("--dc: datacenter \"DC1\""), "{text}");
        let mut bad = args(true);
        bad.dir = d.join("missing");
        let text = crate::one_line(&cert_create(&bad).unwrap_err());
        assert!(
            text.starts_with("--dir ") && text.contains("missing"),
            "{text}"
        );
    }
}
