//! A worker as a child process: spawned with its settings in the
//! environment, its log in a file, stopped with SIGTERM or killed with
//! SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How to start one worker: the settings it gets beyond the defaults.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub exe: PathBuf,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

impl WorkerSpec {
    /// The binary itself, its log, and the given settings only.
    pub fn with_env(exe: impl Into<PathBuf>, env: Vec<(String, String)>, log: PathBuf) -> Self {
        Self {
            exe: exe.into(),
            env,
            log,
        }
    }

    /// The `usage-worker` binary ([`worker_binary`]), with the database and
    /// brokers given.
    pub fn new(database_url: &str, bootstrap: &str, log: PathBuf) -> anyhow::Result<Self> {
        Ok(Self {
            exe: worker_binary()?,
            env: vec![
                ("DATABASE_URL".into(), database_url.into()),
                ("KAFKA_BOOTSTRAP_SERVERS".into(), bootstrap.into()),
            ],
            log,
        })
    }

    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// `KEY=VALUE` settings from the command line.
    pub fn set_all(mut self, settings: &[String]) -> anyhow::Result<Self> {
        for setting in settings {
            let (k, v) = setting
                .split_once('=')
                .with_context(|| format!("--worker-env {setting}: want KEY=VALUE"))?;
            self = self.set(k, v);
        }
        Ok(self)
    }

    /// Starts `usage-worker run`, appending to its log.
    pub fn spawn(&self) -> anyhow::Result<WorkerProcess> {
        let child = self.command("run")?.spawn().context("starting a worker process")?;
        Ok(WorkerProcess {
            child,
            log: self.log.clone(),
        })
    }

    /// Runs `usage-worker migrate` to its end: the database gets the schema
    /// of this binary, which may be an earlier build than the caller's.
    pub fn migrate(&self) -> anyhow::Result<()> {
        let status = self
            .command("migrate")?
            .status()
            .context("running usage-worker migrate")?;
        anyhow::ensure!(
            status.success(),
            "a worker exited ({status}) migrating the database; see {}",
            self.log.display()
        );
        Ok(())
    }

    /// The binary with this subcommand, the spec's settings and none of the
    /// caller's, its stderr appended to the log.
    fn command(&self, subcommand: &str) -> anyhow::Result<Command> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg(subcommand)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        // Only the spec's settings: none of the caller's own.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("USAGE_WORKER")
                || [
                    "RUST_LOG",
                    "DATABASE_URL",
                    "KAFKA_BOOTSTRAP_SERVERS",
                    "HTTP_ADDR",
                    "HTTP_BEARER_TOKEN",
                ]
                .contains(&key.as_ref())
            {
                cmd.env_remove(key.as_ref());
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        Ok(cmd)
    }
}

/// Names the `usage-worker` binary to run.
pub const WORKER_BINARY_VAR: &str = "USAGE_WORKER_BIN";

/// The `usage-worker` binary: `$USAGE_WORKER_BIN`, or the one beside the
/// running program (cargo builds a workspace's binaries into one folder).
pub fn worker_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(WORKER_BINARY_VAR) {
        return Ok(PathBuf::from(path));
    }
    let own = std::env::current_exe().context("locating the running program")?;
    let beside = own.with_file_name("usage-worker");
    if !beside.is_file() {
        bail!(
            "no usage-worker binary at {} (build it with `cargo build --workspace`, \
             or name one with {WORKER_BINARY_VAR})",
            beside.display()
        );
    }
    Ok(beside)
}

pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("a worker exited ({status}); see {}", self.log.display());
        }
        Ok(())
    }

    /// The partitions of its last assignment, from its log, as "[0, 1]", or
    /// None before the first.
    pub fn assignment(&self) -> Option<String> {
        last_assignment(&self.log)
    }

    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("SIGKILL")?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` (SIGKILL after it). The exit
    /// status, or None when it had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        signal(self.pid(), "TERM")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                self.kill()?;
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// User plus system CPU time so far.
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time(self.pid())
    }

    /// Peak resident set size (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).context("reading /proc status")?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc status")?;
        Ok(kib / 1024.0)
    }
}

impl Drop for WorkerProcess {
    /// A harness that fails half-way leaves no worker behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    anyhow::ensure!(status.success(), "kill -{name} {pid}: {status}");
    Ok(())
}

fn last_assignment(log: &Path) -> Option<String> {
    let log = std::fs::read_to_string(log).ok()?;
    log.lines()
        .rev()
        .find(|l| l.contains("partitions assigned"))
        .and_then(|l| l.split("partitions=").nth(1))
        .map(|rest| rest.split(']').next().unwrap_or_default().to_owned() + "]")
}

/// Counts the partitions in an assignment such as "[0, 3, 7]".
pub fn partition_count(assignment: &str) -> usize {
    let inner = assignment.trim_matches(|c| c == '[' || c == ']').trim();
    if inner.is_empty() {
        0
    } else {
        inner.matches(',').count() + 1
    }
}

/// The command name of a process of this host, if there is one.
pub fn command_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|name| name.trim_end().to_owned())
}

/// User plus system CPU time of any process of this host.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc stat")?;
    // The kernel's USER_HZ is 100 on every Linux platform this runs on.
    Ok(Duration::from_millis(cpu_ticks(&stat)? * 10))
}

/// utime + stime, fields 14 and 15 of a /proc/<pid>/stat line.
fn cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    // The command name, field 2, is in parentheses and may hold spaces and
    // parentheses itself: the fields after it start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields
        .get(11..13)
        .context("short /proc stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<_, _>>()?;
    Ok(ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_partitions_of_an_assignment() {
        assert_eq!(partition_count("[]"), 0);
        assert_eq!(partition_count("[4]"), 1);
        assert_eq!(partition_count("[0, 3, 7]"), 3);
    }

    #[test]
    fn reads_cpu_ticks_past_an_odd_command_name() {
        let stat = "4242 (usage (x) worker) S 1 4242 4242 0 -1 4194560 900 0 0 0 137 58 0 0 20 0 9 0 100 1000 50";
        assert_eq!(cpu_ticks(stat).unwrap(), 137 + 58);
        assert!(cpu_ticks("4242 (w) S 1").is_err());
        assert!(cpu_ticks(&std::fs::read_to_string("/proc/self/stat").unwrap()).is_ok());
    }

    #[test]
    fn names_the_command_of_a_local_process_only() {
        let own = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(command_name(std::process::id()).as_deref(), Some(own.trim_end()));
        // Above the kernel's largest pid: no such process here.
        assert_eq!(command_name(4_194_305), None);
    }
}
