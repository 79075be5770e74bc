//! Network namespaces for outage scenarios: `ip netns` and veth pairs made by the test itself, with
//! addresses private to those namespaces (10.231.0.0/24 is the "internet", 10.232.0.0/24 a LAN).
//!
//! Every link lives inside namespaces this module creates (veth ends are created directly in their
//! namespaces, bridges inside a namespace of their own), so the host's own network is never touched
//! and no traffic goes to any address outside them. Names are unique per run; a [`Netns`] deletes its
//! namespace on drop (also on panic), after killing whatever still runs inside it (only processes
//! the test started can be there).
//!
//! Needs root and iproute2: [`Netns::new`] panics with a message saying so when `ip netns add` fails.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The "internet" subnet: the relay at `.1`, facilities' uplinks from `.11`.
pub const INTERNET_PREFIX: &str = "10.231.0";
/// The shelter LAN subnet.
pub const LAN_PREFIX: &str = "10.232.0";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS...`; panics with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace `musubi-<pid>-<n>-<role>` with its loopback up.
    ///
    /// Panics, saying that the test needs root and iproute2, when `ip netns add` fails: the outage
    /// scenario never skips.
    pub fn new(role: &str) -> Netns {
        let name = format!(
            "musubi-{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "`ip netns add {name}` failed ({}): {}\nthis test builds network namespaces: it needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!(
                "cannot run `ip netns add {name}` ({e}); this test builds network namespaces: it needs root and iproute2 (apt-get install iproute2)"
            ),
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a);
    }

    /// `cmd` run inside this namespace (`ip netns exec NAME PROGRAM ARGS...`, same environment and
    /// working directory). `ip netns exec` execs the program, so the child's pid is the program's.
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut w = Command::new("ip");
        w.args(["netns", "exec", &self.name]);
        w.arg(cmd.get_program());
        w.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => w.env(k, v),
                None => w.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            w.current_dir(d);
        }
        w
    }

    /// Process ids of whatever runs in this namespace.
    pub fn pids(&self) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Only processes this test started run in its own namespace; end them by id first, or the
        // namespace would outlive its name.
        for pid in self.pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A veth pair with one end (`a_name`) in `a` and the other (`b_name`) in `b`, both up.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) {
    ip(&[
        "link",
        "add",
        a_name,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", a_name, "up"]);
    b.ip(&["link", "set", b_name, "up"]);
}

/// A segment: a namespace holding a bridge `br0` (multicast flooding on, no snooping) that hosts
/// attach to with [`Segment::attach`].
#[derive(Debug)]
pub struct Segment {
    /// The namespace holding the bridge (and, for the internet, the relay).
    pub ns: Netns,
    prefix: &'static str,
    ports: u32,
}

impl Segment {
    /// A bridge in a new namespace; with `gateway`, the bridge itself has address `PREFIX.1`.
    pub fn new(role: &str, prefix: &'static str, gateway: bool) -> Segment {
        let ns = Netns::new(role);
        ns.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ns.ip(&["link", "set", "br0", "up"]);
        if gateway {
            ns.ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", "br0"]);
        }
        Segment {
            ns,
            prefix,
            ports: 0,
        }
    }

    /// Attaches `host` by a veth pair: `dev` in `host` gets `PREFIX.HOST_OCTET/24` and a multicast
    /// route (224.0.0.0/4, so mDNS goes out on this link); the other end joins the bridge.
    pub fn attach(&mut self, host: &Netns, dev: &str, host_octet: u8, multicast: bool) -> String {
        self.ports += 1;
        let port = format!("p{}", self.ports);
        veth(host, dev, &self.ns, &port);
        self.ns.ip(&["link", "set", &port, "master", "br0"]);
        let addr = format!("{}.{host_octet}", self.prefix);
        host.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev]);
        if multicast {
            host.ip(&["link", "set", dev, "multicast", "on"]);
            host.ip(&["route", "add", "224.0.0.0/4", "dev", dev]);
        } else {
            host.ip(&["link", "set", dev, "multicast", "off"]);
        }
        addr
    }

    /// The gateway address (`PREFIX.1`).
    pub fn gateway(&self) -> String {
        format!("{}.1", self.prefix)
    }
}

/// Brings `dev` in `ns` down (the cable is pulled) or up.
pub fn set_link(ns: &Netns, dev: &str, up: bool) {
    ns.ip(&["link", "set", dev, if up { "up" } else { "down" }]);
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Spawned {
    /// What it is, for messages.
    pub what: String,
    /// The process.
    pub child: Child,
}

impl Spawned {
    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
