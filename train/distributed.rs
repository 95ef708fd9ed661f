//! Data-parallel runs on PyTorch's distributed engine (c10d, through `native::ProcessGroup`):
//! who this process is (rank, world size, local rank, rendezvous address) from the environment
//! that `torchrun` or Slurm's `srun` sets, which backend to use, and the group itself.
//!
//! Launchers: `torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under
//! `srun` (no RANK set), SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID give the first three, the
//! first host of SLURM_JOB_NODELIST the address (unless MASTER_ADDR is set) and MASTER_PORT or
//! 29500 the port. Anything else is a single-process run.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::native::{GroupSpec, ProcessGroup};

/// torchrun's default rendezvous port, used under Slurm when MASTER_PORT is unset.
pub const DEFAULT_PORT: u16 = 29500;
/// Collectives and the rendezvous fail after this long unless CLOVER_DIST_TIMEOUT (seconds)
/// says otherwise: long enough for rank 0's evaluation and checkpoints, short enough that a
/// rank that died does not leave the others waiting for hours.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Gradients travel in flat buckets of this many bytes, one reduction each (DDP's default).
pub const BUCKET_BYTES: usize = 25 << 20;

/// This process's place in a multi-process launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// Rank within this node: the CUDA device index a rank uses.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// When torchrun's agent already serves a store on MASTER_PORT
    /// (TORCHELASTIC_USE_AGENT_STORE=True), every rank joins it as a client, as torch.distributed
    /// does, with its keys under this prefix ("clover/attempt_<restart count>", so a restarted
    /// attempt never reads an earlier one's). None: rank 0 serves the store.
    pub agent_store: Option<String>,
}

/// Which c10d backend carries the collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// NCCL when the run is on CUDA, Gloo on the CPU.
    Auto,
    Gloo,
    Nccl,
}

impl Backend {
    /// The backend's c10d name for a run on CUDA (`on_cuda`) or the CPU.
    pub fn resolve(self, on_cuda: bool) -> &'static str {
        match (self, on_cuda) {
            (Backend::Gloo, _) | (Backend::Auto, false) => "gloo",
            (Backend::Nccl, _) | (Backend::Auto, true) => "nccl",
        }
    }
}

impl Launch {
    /// The launch this process is part of, from its environment; None for a single process.
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    /// As `from_env`, reading variables through `var` (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        if var("WORLD_SIZE").is_some() || var("RANK").is_some() {
            return Self::torchrun(&var).map(Some);
        }
        let tasks: usize = match var("SLURM_NTASKS") {
            Some(n) => number(&var, "SLURM_NTASKS", Some(n))?,
            None => 0,
        };
        if tasks > 1 {
            Self::slurm(&var).map(Some)
        } else {
            Ok(None)
        }
    }

    fn torchrun(var: &impl Fn(&str) -> Option<String>) -> Result<Launch> {
        let launch = Launch {
            rank: number(var, "RANK", var("RANK"))?,
            world: number(var, "WORLD_SIZE", var("WORLD_SIZE"))?,
            local_rank: number(var, "LOCAL_RANK", var("LOCAL_RANK"))?,
            master_addr: required(var, "MASTER_ADDR")?,
            master_port: number(var, "MASTER_PORT", var("MASTER_PORT"))?,
            agent_store: agent_store(var),
        };
        launch.checked()
    }

    fn slurm(var: &impl Fn(&str) -> Option<String>) -> Result<Launch> {
        let master_addr = match var("MASTER_ADDR") {
            Some(addr) => addr,
            None => {
                let list = var("SLURM_JOB_NODELIST")
                    .or_else(|| var("SLURM_NODELIST"))
                    .context(
                        "under Slurm, set MASTER_ADDR or SLURM_JOB_NODELIST (neither is set)",
                    )?;
                first_host(&list).with_context(|| format!("SLURM_JOB_NODELIST = {list:?}"))?
            }
        };
        let master_port = match var("MASTER_PORT") {
            Some(port) => number(var, "MASTER_PORT", Some(port))?,
            None => DEFAULT_PORT,
        };
        let launch = Launch {
            rank: number(var, "SLURM_PROCID", var("SLURM_PROCID"))?,
            world: number(var, "SLURM_NTASKS", var("SLURM_NTASKS"))?,
            local_rank: number(var, "SLURM_LOCALID", var("SLURM_LOCALID"))?,
            master_addr,
            master_port,
            agent_store: None,
        };
        launch.checked()
    }

    fn checked(self) -> Result<Launch> {
        if self.world == 0 || self.rank >= self.world {
            bail!(
                "rank {} is outside a world of size {} (RANK must be in 0..WORLD_SIZE)",
                self.rank,
                self.world
            );
        }
        Ok(self)
    }

    /// This launch's `i/N` part, as `--shard` takes it.
    pub fn shard(&self) -> String {
        format!("{}/{}", self.rank, self.world)
    }

    /// Joins the launch's process group with `backend` ("gloo" or "nccl").
    pub fn join(&self, backend: &'static str) -> Result<Group> {
        // NCCL reduces only tensors on this rank's GPU; Gloo takes host tensors (and CUDA ones).
        let device = match backend {
            "nccl" => tch::Device::Cuda(self.local_rank),
            _ => tch::Device::Cpu,
        };
        let timeout = timeout_from_env()?;
        let group = ProcessGroup::join(&GroupSpec {
            backend,
            host: &self.master_addr,
            port: self.master_port,
            agent_store: self.agent_store.as_deref(),
            rank: self.rank,
            world: self.world,
            timeout,
        })?;
        Ok(Group {
            group,
            rank: self.rank,
            world: self.world,
            local_rank: self.local_rank,
            device,
        })
    }
}

/// A joined process group and this process's place in it.
pub struct Group {
    pub group: ProcessGroup,
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Where the backend takes tensors: this rank's GPU for NCCL, the host for Gloo.
    pub device: tch::Device,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {})", self.rank, self.world)
    }
}

impl Group {
    /// Sums the tensors over all ranks, in place, in buckets of `BUCKET_BYTES`.
    pub fn sum(&self, tensors: &[&tch::Tensor]) -> Result<()> {
        self.group.all_reduce(tensors, false, BUCKET_BYTES)
    }

    /// Overwrites the tensors with rank 0's.
    pub fn broadcast_from_first(&self, tensors: &[&tch::Tensor]) -> Result<()> {
        self.group.broadcast(tensors, 0, BUCKET_BYTES)
    }

    /// `sum` for small host tensors (step figures), through the backend's device.
    pub fn sum_host(&self, tensors: &[&tch::Tensor]) -> Result<()> {
        self.through_device(tensors, |moved| self.sum(moved))
    }

    /// `broadcast_from_first` for small host tensors, through the backend's device.
    pub fn broadcast_host_from_first(&self, tensors: &[&tch::Tensor]) -> Result<()> {
        self.through_device(tensors, |moved| self.broadcast_from_first(moved))
    }

    /// Runs `collective` on copies of `tensors` on the backend's device, then copies back.
    fn through_device(
        &self,
        tensors: &[&tch::Tensor],
        collective: impl FnOnce(&[&tch::Tensor]) -> Result<()>,
    ) -> Result<()> {
        if self.device == tch::Device::Cpu {
            return collective(tensors);
        }
        let moved: Vec<tch::Tensor> = tensors.iter().map(|t| t.to_device(self.device)).collect();
        collective(&moved.iter().collect::<Vec<_>>())?;
        for (t, m) in tensors.iter().zip(&moved) {
            t.shallow_clone().copy_(m);
        }
        Ok(())
    }

    pub fn is_first(&self) -> bool {
        self.rank == 0
    }
}

/// `--shard i/N` as given, unless it is the default "0/1" and this process is one of a launch,
/// which then decides it (one `torchrun`/`srun` line runs a stage on all devices).
pub fn shard_or_launch(shard: &str) -> Result<String> {
    Ok(match Launch::from_env()? {
        Some(launch) if shard == "0/1" => launch.shard(),
        _ => shard.to_string(),
    })
}

/// `--shard i/N` as (i, N).
pub fn parse_shard(spec: &str) -> Result<(usize, usize)> {
    let parsed = spec
        .split_once('/')
        .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)));
    match parsed {
        Some((i, n)) if n > 0 && i < n => Ok((i, n)),
        _ => bail!("--shard must be i/N with 0 <= i < N, got {spec:?}"),
    }
}

/// The range CLOVER_DIST_TIMEOUT may set: at least a second (a collective of a real model takes
/// that long), at most a week (beyond it a dead rank would hold the others forever).
pub const TIMEOUT_RANGE_SECS: std::ops::RangeInclusive<f64> = 1.0..=7.0 * 86400.0;

/// The collectives' timeout: CLOVER_DIST_TIMEOUT seconds (within `TIMEOUT_RANGE_SECS`), or
/// `DEFAULT_TIMEOUT`.
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var("CLOVER_DIST_TIMEOUT") {
        Ok(s) => crate::checks::seconds_in("CLOVER_DIST_TIMEOUT", &s, TIMEOUT_RANGE_SECS)
            .map_err(anyhow::Error::msg),
        Err(_) => Ok(DEFAULT_TIMEOUT),
    }
}

fn agent_store(var: &impl Fn(&str) -> Option<String>) -> Option<String> {
    let used = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let attempt = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
    used.then(|| format!("clover/attempt_{attempt}"))
}

fn required(var: &impl Fn(&str) -> Option<String>, name: &str) -> Result<String> {
    var(name).with_context(|| {
        format!("{name} is not set (a distributed launch needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, as torchrun sets them)")
    })
}

fn number<T: std::str::FromStr>(
    var: &impl Fn(&str) -> Option<String>,
    name: &str,
    value: Option<String>,
) -> Result<T> {
    let value = match value {
        Some(v) => v,
        None => required(var, name)?,
    };
    value
        .trim()
        .parse()
        .ok()
        .with_context(|| format!("{name} = {value:?} is not a valid number"))
}

/// The first host of a Slurm node list: "gpu[003-005,9],cpu1" -> "gpu003".
pub fn first_host(list: &str) -> Result<String> {
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            depth += (c == '[') as i32 - (c == ']') as i32;
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let first = list[..end].trim();
    let host = match (first.find('['), first.find(']')) {
        (None, None) => first.to_string(),
        (Some(open), Some(close)) if open < close => {
            let range = &first[open + 1..close];
            let start = range.split([',', '-']).next().unwrap_or("");
            format!("{}{}{}", &first[..open], start, &first[close + 1..])
        }
        _ => bail!("cannot read the node list {list:?}"),
    };
    if host.is_empty() {
        bail!("the node list {list:?} names no host");
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn torchrun_variables_make_a_launch_and_a_missing_one_is_named() {
        let full = [
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
        ];
        let l = launch(&full).unwrap().unwrap();
        assert_eq!(
            (l.rank, l.world, l.local_rank, l.master_port),
            (3, 8, 1, 29400)
        );
        assert_eq!(l.shard(), "3/8");
        assert_eq!(l.agent_store, None, "rank 0 serves the store");
        let mut agent = full.to_vec();
        agent.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        agent.push(("TORCHELASTIC_RESTART_COUNT", "2"));
        let l = launch(&agent).unwrap().unwrap();
        assert_eq!(
            l.agent_store.as_deref(),
            Some("clover/attempt_2"),
            "torchrun's agent serves it"
        );
        for skip in 0..full.len() {
            let some: Vec<_> = full
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, kv)| *kv)
                .collect();
            let err = format!("{:#}", launch(&some).unwrap_err());
            assert!(err.contains(full[skip].0), "{err}");
        }
        let bad = [
            ("RANK", "8"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ];
        assert!(launch(&bad).is_err(), "rank outside the world");
        assert_eq!(launch(&[]).unwrap(), None, "no launcher: a single process");
    }

    #[test]
    fn slurm_variables_make_a_launch_from_the_first_host() {
        let l = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[003-005,9],cpu1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(l.master_addr, "gpu003");
        assert_eq!(
            (l.rank, l.world, l.local_rank, l.master_port),
            (5, 16, 1, DEFAULT_PORT)
        );
        assert_eq!(
            launch(&[("SLURM_NTASKS", "1")]).unwrap(),
            None,
            "one task: single process"
        );
        let err = format!(
            "{:#}",
            launch(&[
                ("SLURM_NTASKS", "2"),
                ("SLURM_PROCID", "0"),
                ("SLURM_LOCALID", "0")
            ])
            .unwrap_err()
        );
        assert!(err.contains("SLURM_JOB_NODELIST"), "{err}");
    }

    #[test]
    fn first_host_reads_slurm_node_lists() {
        assert_eq!(first_host("node7").unwrap(), "node7");
        assert_eq!(first_host("a1,b2").unwrap(), "a1");
        assert_eq!(first_host("n[01-04]").unwrap(), "n01");
        assert_eq!(first_host("n[7,9-10]-ib,x").unwrap(), "n7-ib");
        assert!(first_host("").is_err());
    }

    #[test]
    fn auto_backend_is_nccl_on_cuda_and_gloo_on_the_cpu() {
        assert_eq!(Backend::Auto.resolve(true), "nccl");
        assert_eq!(Backend::Auto.resolve(false), "gloo");
        assert_eq!(Backend::Gloo.resolve(true), "gloo");
        assert_eq!(Backend::Nccl.resolve(false), "nccl");
    }
}
