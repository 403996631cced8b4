//! A private PostgreSQL server in a temporary folder, on a port of its own,
//! that can be crashed and restarted without disturbing anything else.
//! initdb and pg_ctl refuse to run as root: as root they run as `postgres`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

pub struct PrivatePostgres {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    keep: bool,
}

impl PrivatePostgres {
    /// initdb into a new folder under the temp dir and start the server.
    /// `keep` leaves the folder (data and server log) behind.
    pub fn start(keep: bool) -> anyhow::Result<Self> {
        let bin = server_bin_dir()?;
        let root = std::env::temp_dir().join(format!("usage-worker-pg-{}", std::process::id()));
        if root.exists() {
            std::fs::remove_dir_all(&root)?;
        }
        std::fs::create_dir_all(&root)?;
        let as_postgres = is_root()?;
        if as_postgres {
            run(Command::new("chown").arg("postgres:postgres").arg(&root))?;
        }
        let pg = Self {
            port: free_port()?,
            root,
            bin,
            as_postgres,
            keep,
        };
        pg.command("initdb")
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "-D"])
            .arg(pg.data())
            .status_ok()?;
        pg.start_server()?;
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable", self.port)
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.root.display()
        );
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.root.join("server.log"))
            .args(["-w", "-t", "120", "-o", &options, "start"])
            .status_ok()
    }

    /// Stops the server as a crash would: no checkpoint, recovery from the
    /// WAL at the next start.
    pub fn crash(&self) -> anyhow::Result<()> {
        self.stop("immediate")
    }

    fn stop(&self, mode: &str) -> anyhow::Result<()> {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", "60", "stop"])
            .status_ok()
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(exe);
            cmd
        } else {
            Command::new(exe)
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop("fast");
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

trait StatusOk {
    fn status_ok(&mut self) -> anyhow::Result<()>;
}

impl StatusOk for Command {
    /// Runs it, quietly unless it fails.
    fn status_ok(&mut self) -> anyhow::Result<()> {
        run(self)
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?}: {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The server's programs: USAGE_WORKER_PG_BIN, or the newest
/// /usr/lib/postgresql/<version>/bin (Debian's layout).
fn server_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("USAGE_WORKER_PG_BIN") {
        return Ok(dir.into());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: set USAGE_WORKER_PG_BIN to the folder of initdb and pg_ctl")?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no initdb under /usr/lib/postgresql/*/bin: set USAGE_WORKER_PG_BIN")
}

fn is_root() -> anyhow::Result<bool> {
    let out = Command::new("id").arg("-u").output().context("running id -u")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// A port nothing listens on now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
