//! `weft-demo` (run by `cargo xtask demo`, as root): weft end to end on one
//! machine. Two nodes as network namespaces joined by a veth, a dev server,
//! two agents in transparent (eBPF) mode and two workloads: `web` on node A,
//! `api` on node B. web calls `http://api.service.weft:8080/` by name; an
//! intention then denies it; the agents' metrics show both. Every command is
//! printed with its output. Everything is removed at the end, also when a
//! step fails or on Ctrl-C.
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use weft_tests::mesh::{wait_until, Mesh, MeshSpec, Node, Output, Service};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM end the demo at the next step, with the cleanup.
fn catch_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn step(title: &str) -> anyhow::Result<()> {
    check_interrupted()?;
    println!("\n== {title}");
    Ok(())
}

fn say(text: &str) {
    for line in text.lines() {
        if line.is_empty() {
            println!();
        } else {
            println!("   {line}");
        }
    }
}

/// Prints `where $ command` and what it printed, indented; a non-zero exit
/// is shown with its code.
fn show(place: &str, command: &str, out: &Output) {
    println!("\n  {place} $ {command}");
    for line in out.stdout.lines() {
        println!("    {line}");
    }
    for line in out.stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("    {line}");
    }
    match out.status {
        Some(status) if status.success() => {}
        Some(status) => println!("    [exit {}]", status.code().unwrap_or(-1)),
        None => println!("    [killed at the time limit]"),
    }
}

fn weft(mesh: &Mesh, args: &[&str]) -> anyhow::Result<Output> {
    let out = mesh.weft_raw(args)?;
    show("node-a", &format!("weft {}", args.join(" ")), &out);
    Ok(out)
}

/// Writes `text` to `name` in the mesh's directory and shows it.
fn write_file(mesh: &Mesh, name: &str, text: &str) -> anyhow::Result<String> {
    let path = mesh.path(name);
    std::fs::write(&path, text)?;
    println!("\n  {}:", path.display());
    for line in text.lines() {
        println!("    {line}");
    }
    Ok(path.display().to_string())
}

/// Who the demo's workloads run as: not root, as a workload should not
/// (`weft-agent exec --user`).
const WORKLOAD_USER: &str = "nobody";

fn as_web(mesh: &Mesh, args: &[&str]) -> anyhow::Result<Output> {
    let out = mesh.exec_as_user(Node::A, "web", WORKLOAD_USER, args)?;
    show("node-a (as web)", &args.join(" "), &out);
    Ok(out)
}

/// The lines of node's /metrics about connections, denials and eBPF events.
fn show_metrics(mesh: &Mesh, node: Node) -> anyhow::Result<()> {
    check_interrupted()?;
    let text = mesh.metrics(node)?;
    println!(
        "\n  {} $ curl -s http://127.0.0.1:15020/metrics | grep …",
        node.node_name()
    );
    for line in text.lines().filter(|l| {
        !l.starts_with('#')
            && [
                "weft_agent_connections_opened_total",
                "weft_agent_intention_denials_total",
                "weft_agent_ebpf_events_total",
            ]
            .iter()
            .any(|m| l.starts_with(m))
    }) {
        println!("    {line}");
    }
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    step("starting the mesh: two nodes, a dev server, two agents in eBPF mode")?;
    let spec = MeshSpec::new("allow")
        .ebpf()
        .node_a(
            Service::new("web", 8000)
                .id("web-1")
                .address(MeshSpec::NODE_ADDR)
                .healthz_check("1s")
                .cgroup("web"),
        )
        .node_b(
            Service::new("api", 8080)
                .id("api-1")
                .address(MeshSpec::NODE_ADDR)
                .healthz_check("1s")
                .cgroup("api")
                .meta("version", "v1"),
        )
        .node_b(
            Service::new("api", 8081)
                .id("api-2")
                .address(MeshSpec::NODE_ADDR)
                .healthz_check("1s")
                .cgroup("api")
                .meta("version", "v2"),
        );
    let mut mesh = Mesh::start(spec)?;
    let (a, b) = (mesh.ip(Node::A), mesh.ip(Node::B));
    say(&format!(
        "node-a: network namespace {} at {a}/24; weft-server (default intention allow) on {a}:8502,
TLS 1.3 on every port, ACLs on: the CLI here holds the management token, each agent
a token with its node's identity and its services' (token_file in its agent.toml)
node-b: network namespace {} at {b}/24
The namespaces are joined by one veth and have no default route.
Each node runs weft-agent with ebpf = true: its programs are attached to its own
cgroup subtree ({} and …/b), and it answers DNS for NAME.service.weft on 127.0.0.1:53.",
        mesh.netns(Node::A).name(),
        mesh.netns(Node::B).name(),
        mesh.cgroup_root(Node::A).unwrap_or_default().display(),
    ));
    println!("\n  node-a's agent.toml:");
    for line in std::fs::read_to_string(mesh.agent_config(Node::A))?
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        println!("    {line}");
    }

    // The server's HTTP port is inside node-a's namespace: a relay brings
    // it to this machine's loopback for a browser.
    let ui =
        weft_tests::relay::Relay::start_into(mesh.netns(Node::A), format!("{a}:8500").parse()?)?;
    say(&format!(
        "\nThe web UI (live topology, services, intentions, nodes, KV) while the demo runs:\n  \
         https://{}/ui/\n\
         log in with the management token {}\n\
         (the server's certificate is signed by the demo's own CA, {}: the browser warns)",
        ui.addr(),
        mesh.token,
        mesh.path("ca.pem").display()
    ));

    step("workloads: web on node-a; api (v1 and v2) on node-b; each in its service's cgroup")?;
    let exec = format!(
        "weft-agent exec --config {} --service web -- CMD",
        mesh.agent_config(Node::A).display()
    );
    say(&format!(
        "A command runs as a service's workload with\n  {exec}\n\
         (inside the node's namespace; here also with a private /etc/resolv.conf\n\
         that says `nameserver 127.0.0.1`, so that names resolve through the agent)."
    ));
    let workload = weft_tests::servers::bin("weft-workload");
    let workload = workload.to_str().context("workload path")?;
    mesh.spawn_as(
        Node::B,
        "api",
        &[workload, &format!("{b}:8080"), "api-1"],
        "workload-api-1.log",
    )?;
    mesh.spawn_as(
        Node::B,
        "api",
        &[workload, &format!("{b}:8081"), "api-2"],
        "workload-api-2.log",
    )?;
    mesh.spawn_as(
        Node::A,
        "web",
        &[workload, &format!("{a}:8000"), "web-1"],
        "workload-web-1.log",
    )?;
    wait_until(Duration::from_secs(30), "web and api passing", || {
        check_interrupted()?;
        let passing = |s: &str| -> anyhow::Result<bool> {
            Ok(mesh
                .catalog_instances(s)?
                .iter()
                .any(|(_, _, h)| h == "passing"))
        };
        let api_passing = mesh
            .catalog_instances("api")?
            .iter()
            .filter(|(_, _, h)| h == "passing")
            .count();
        Ok((passing("web")? && api_passing == 2).then_some(()))
    })?;
    weft(&mesh, &["catalog", "services"])?;
    weft(&mesh, &["catalog", "service", "api"])?;

    step("the control plane refuses strangers and keeps identities to their nodes")?;
    let command = "weft ca leaf api";
    let out = mesh.weft_as(Node::B, None, &["ca", "leaf", "api"])?;
    show("node-b (no token)", command, &out);
    let web_token = std::fs::read_to_string(mesh.path("agent-a.token"))?;
    let out = mesh.weft_as(Node::B, Some(web_token.trim()), &["ca", "leaf", "api"])?;
    show("node-b (node-a's agent token)", command, &out);
    say(
        "A certificate for api goes only to a token that may write api: node-b's agent,\n\
         for the api instances registered on node-b, or an operator.",
    );

    step("web calls api by name")?;
    let url = "http://api.service.weft:8080/hello";
    // The agents learn of api's instance through their watch streams.
    wait_until(Duration::from_secs(20), "web reaches api", || {
        check_interrupted()?;
        Ok(mesh.curl_as(Node::A, "web", url, &["-m", "2"]).ok())
    })?;
    as_web(&mesh, &["getent", "hosts", "api.service.weft"])?;
    let out = as_web(&mesh, &["curl", "-sS", "-m", "5", url])?;
    if !out.success() {
        bail!("web could not reach api by name");
    }
    say(
        "\nThe name resolved to api's virtual IP. Nothing in node-a routes there: the\n\
         connect hook took the connection to node-a's agent, which carried it in\n\
         an HTTP/2 CONNECT tunnel over mutual TLS (SPIFFE ids) to node-b's agent\n\
         on :15008, which checked the intentions and handed it to api.",
    );
    let out = mesh.run_with_mesh_dns(
        Node::A,
        &["curl", "-sS", "-m", "2", url],
        Duration::from_secs(10),
    )?;
    show(
        "node-a (no mesh cgroup)",
        &format!("curl -sS -m 2 {url}"),
        &out,
    );
    say("A process outside the mesh's cgroups is left alone: no route to the virtual IP.");

    step("a bypass attempt: api's real address, from outside the mesh")?;
    let direct = format!("http://{b}:8080/hello");
    let out = mesh.run_with_mesh_dns(
        Node::A,
        &["curl", "-sS", "-m", "2", &direct],
        Duration::from_secs(10),
    )?;
    show(
        "node-a (no mesh cgroup)",
        &format!("curl -sS -m 2 {direct}"),
        &out,
    );
    if out.success() {
        bail!("a process outside the mesh reached api around the agents");
    }
    let out = mesh.run_with_mesh_dns(
        Node::B,
        &["curl", "-sS", "-m", "2", &direct],
        Duration::from_secs(10),
    )?;
    show(
        "node-b (no mesh cgroup)",
        &format!("curl -sS -m 2 {direct}"),
        &out,
    );
    if out.success() {
        bail!("a local process outside the mesh reached api around its agent");
    }
    say(
        "Refused in the kernel: api's sockets take only connection attempts that carry\n\
         the agent's socket mark (inbound capture, strict by default). The one way in\n\
         is through node-b's agent, which checks who is calling.",
    );
    std::thread::sleep(Duration::from_millis(1100)); // eBPF counters are copied every second
    show_metrics(&mesh, Node::A)?;

    step("an intention denies web -> api")?;
    weft(&mesh, &["intention", "create", "web", "api", "--deny"])?;
    weft(&mesh, &["intention", "check", "web", "api"])?;
    std::thread::sleep(Duration::from_millis(500)); // the agents hear of it at once; be generous
    let out = as_web(&mesh, &["curl", "-sS", "-m", "5", url])?;
    if out.success() {
        bail!("the deny intention did not stop web -> api");
    }
    say("Refused: the connection is reset instead of reaching api.");
    std::thread::sleep(Duration::from_millis(1100)); // eBPF counters are copied every second
    show_metrics(&mesh, Node::A)?;
    show_metrics(&mesh, Node::B)?;
    say(
        "\nconnections_opened counts what the agents carried, intention_denials what they\n\
         refused, ebpf_events what the kernel programs did (redirected to the agent,\n\
         rekeyed once established, closed).",
    );

    step("deleting the intention lets web through again")?;
    weft(&mesh, &["intention", "delete", "web", "api"])?;
    wait_until(Duration::from_secs(5), "web reaches api again", || {
        check_interrupted()?;
        Ok(mesh.curl_as(Node::A, "web", url, &["-m", "2"]).ok())
    })?;
    as_web(&mesh, &["curl", "-sS", "-m", "5", url])?;

    step("L7: api speaks HTTP, and web may only GET /hello on it")?;
    let defaults = "Kind = \"service-defaults\"\nName = \"api\"\nProtocol = \"http\"\n";
    let l7 = "[[Permissions]]\nAction = \"allow\"\nHTTP = { PathExact = \"/hello\", Methods = [\"GET\"] }\n\n\
              [[Permissions]]\nAction = \"deny\"\nHTTP = { PathPrefix = \"/\" }\n";
    let defaults_file = write_file(&mesh, "api-defaults.toml", defaults)?;
    let l7_file = write_file(&mesh, "web-api-l7.toml", l7)?;
    weft(&mesh, &["config", "write", &defaults_file])?;
    weft(
        &mesh,
        &["intention", "create", "web", "api", "--file", &l7_file],
    )?;
    let admin = "http://api.service.weft:8080/admin";
    wait_until(Duration::from_secs(5), "GET /admin refused", || {
        check_interrupted()?;
        let out = mesh.exec_as_user(
            Node::A,
            "web",
            WORKLOAD_USER,
            &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", admin],
        )?;
        Ok((out.stdout.trim() == "403").then_some(()))
    })?;
    as_web(&mesh, &["curl", "-sS", "-m", "5", url])?;
    as_web(
        &mesh,
        &["curl", "-sS", "-m", "5", "-w", "[HTTP %{http_code}]", admin],
    )?;
    as_web(
        &mesh,
        &[
            "curl",
            "-sS",
            "-m",
            "5",
            "-X",
            "POST",
            "-w",
            "[HTTP %{http_code}]",
            url,
        ],
    )?;
    say(
        "\nThe agents now speak HTTP on web -> api connections and judge every request on\n\
         its method, path and headers; a refused one gets a 403 that names the deciding\n\
         intention and permission, and never reaches api.",
    );
    weft(&mesh, &["intention", "delete", "web", "api"])?;

    step("a canary: requests with x-canary: 1 go to api v2, the others to v1")?;
    let resolver = "Kind = \"service-resolver\"\nName = \"api\"\nDefaultSubset = \"v1\"\n\
                    [Subsets.v1]\nFilter = \"Service.Meta.version == v1\"\n\
                    [Subsets.v2]\nFilter = \"Service.Meta.version == v2\"\n";
    let router = "Kind = \"service-router\"\nName = \"api\"\n[[Routes]]\n\
                  [Routes.Match.HTTP]\nHeader = [ { Name = \"x-canary\", Exact = \"1\" } ]\n\
                  [Routes.Destination]\nServiceSubset = \"v2\"\n";
    let resolver_file = write_file(&mesh, "api-resolver.toml", resolver)?;
    let router_file = write_file(&mesh, "api-router.toml", router)?;
    weft(&mesh, &["config", "write", &resolver_file])?;
    weft(&mesh, &["config", "write", &router_file])?;
    wait_until(Duration::from_secs(5), "the canary route applies", || {
        check_interrupted()?;
        let out = mesh.exec_as_user(
            Node::A,
            "web",
            WORKLOAD_USER,
            &["curl", "-s", "-m", "2", "-H", "x-canary: 1", url],
        )?;
        Ok((out.stdout.trim() == "instance api-2").then_some(()))
    })?;
    for _ in 0..3 {
        as_web(&mesh, &["curl", "-sS", "-m", "5", url])?;
    }
    for _ in 0..3 {
        as_web(&mesh, &["curl", "-sS", "-m", "5", "-H", "x-canary: 1", url])?;
    }
    say(
        "\nnode-a's agent routes each request on its own: the router's header match picks\n\
         subset v2, otherwise the resolver's default subset v1; subsets select instances\n\
         by their meta. A service-splitter would split by weight the same way.",
    );

    hold_for_the_ui(&mesh, &ui.addr().to_string(), url)?;
    println!("\n== done; cleaning up: processes, cgroups, network namespaces, files");
    drop(ui);
    drop(mesh);
    Ok(())
}

/// On a terminal: keeps the mesh up for the UI until Enter or Ctrl-C,
/// with web calling api about once a second so the graph stays live.
fn hold_for_the_ui(mesh: &Mesh, addr: &str, url: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Ok(());
    }
    println!(
        "\n== the mesh stays up for the UI at https://{addr}/ui/: press Enter (or Ctrl-C) to end"
    );
    let mut fds = libc::pollfd {
        fd: libc::STDIN_FILENO,
        events: libc::POLLIN,
        revents: 0,
    };
    // At most an hour, checking for Ctrl-C every 200 ms.
    for tick in 0..18_000 {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Ok(());
        }
        if tick % 5 == 0 {
            let _ = mesh.exec_as_user(
                Node::A,
                "web",
                WORKLOAD_USER,
                &["curl", "-s", "-m", "1", url],
            );
        }
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut fds, 1, 200) } > 0 {
            return Ok(());
        }
    }
    Ok(())
}

/// `weft-demo --datacenters`: two datacenters federated through mesh
/// gateways (explicit mode): dc1's web reaches api in dc2 by an upstream
/// that names dc2, and its plain api upstream fails over to dc2 when dc1's
/// api fails, then comes back.
fn datacenters_demo() -> anyhow::Result<()> {
    use weft_tests::federation::{DcSpec, Federation, Place};
    step(
        "starting two datacenters: dc1 (primary: a server, web's node, api's node, a gateway) and dc2 (a server, api's node, a gateway)",
    )?;
    let api = "[[service]]\nname = \"api\"\nport = 8080\naddress = \"NODE\"\n\
               [[service.check]]\nhttp = \"http://NODE:8080/healthz\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n";
    let web = "[[service]]\nname = \"web\"\nport = 8000\n\
               [[service.upstream]]\nname = \"api\"\nlocal_port = 9191\n\
               [[service.upstream]]\nname = \"api\"\nlocal_port = 9192\ndatacenter = \"dc2\"\n";
    let mut fed = Federation::start([
        DcSpec {
            gateways: 1,
            services: web.to_string(),
            service_names: vec!["web".into()],
            ebpf: false,
            second_node: Some((api.to_string(), vec!["api".into()])),
        },
        DcSpec {
            gateways: 1,
            services: api.to_string(),
            service_names: vec!["api".into()],
            ebpf: false,
            second_node: None,
        },
    ])?;
    fed.passed = true; // the demo prints what it does; no log tails at the end
    let (api1, api2) = (
        format!("{}:8080", fed.lan_ip(0, 100)),
        format!("{}:8080", fed.lan_ip(1, 1)),
    );
    say(&format!(
        "dc1's LAN {}/24 and dc2's LAN {}/24 do not route to each other; only the gateways\n\
         ({} and {}) share the WAN. dc2's server knew only dc1's gateway's WAN address.",
        fed.lan_ip(0, 0),
        fed.lan_ip(1, 0),
        fed.gateway_wan(0, 0),
        fed.gateway_wan(1, 0)
    ));
    fed.workload_in(0, Place::Second, "api-dc1", &api1)?;
    fed.workload(1, "api-dc2", &api2)?;
    for k in 0..2 {
        let out = fed.weft(k, &["members", "--wan"])?;
        show(
            &format!("dc{} server", k + 1),
            "weft members --wan",
            &ok_output(out),
        );
    }
    wait_until(Duration::from_secs(30), "dc1 to see dc2's api", || {
        let out = fed
            .weft(0, &["catalog", "service", "api", "--dc", "dc2"])
            .ok();
        Ok(out.filter(|o| o.contains("passing")).map(|_| ()))
    })?;
    let out = fed.weft(0, &["catalog", "service", "api", "--dc", "dc2"])?;
    show(
        "dc1 server",
        "weft catalog service api --dc dc2",
        &ok_output(out),
    );

    step("web in dc1 calls api: its own datacenter's, and dc2's through the gateways")?;
    let ask = |port: u16| -> anyhow::Result<Output> {
        let url = format!("http://127.0.0.1:{port}/");
        let out = fed.curl(0, &["-s", "-m", "3", &url])?;
        show("dc1 node-a (web)", &format!("curl {url}"), &out);
        Ok(out)
    };
    ask(9191)?;
    ask(9192)?;
    let dig = fed.run_in(
        fed.lan(0),
        "dig",
        &["@127.0.0.1", "-p", "8600", "+short", "api.service.dc2.weft"],
        Duration::from_secs(10),
    )?;
    show(
        "dc1 node-a",
        "dig @127.0.0.1 -p 8600 +short api.service.dc2.weft",
        &dig,
    );
    say("(a virtual IP dc1 gave dc2's api: in eBPF mode workloads call it by that name)");

    step("failover: api's resolver sends it to dc2 when no instance passes in dc1")?;
    let resolver = fed.path("api-resolver.hcl");
    std::fs::write(
        &resolver,
        "Kind = \"service-resolver\"\nName = \"api\"\nFailover = { \"*\" = { Datacenters = [\"dc2\"] } }\n",
    )?;
    let out = fed.weft(0, &["config", "write", &resolver.display().to_string()])?;
    show(
        "dc1 server",
        "weft config write api-resolver.hcl",
        &ok_output(out),
    );
    let fail = fed.curl(0, &["-s", "-m", "3", &format!("http://{api1}/fail")])?;
    show(
        "dc1",
        &format!("curl http://{api1}/fail   # api-dc1's health check now fails"),
        &fail,
    );
    let to_dc2 = wait_until(Duration::from_secs(20), "api to fail over to dc2", || {
        let out = fed.curl(0, &["-s", "-m", "3", "http://127.0.0.1:9191/"])?;
        Ok(out.stdout.contains("api-dc2").then_some(()))
    });
    to_dc2?;
    ask(9191)?;
    let recover = fed.curl(0, &["-s", "-m", "3", &format!("http://{api1}/recover")])?;
    show("dc1", &format!("curl http://{api1}/recover"), &recover);
    wait_until(Duration::from_secs(20), "api to come back to dc1", || {
        let out = fed.curl(0, &["-s", "-m", "3", "http://127.0.0.1:9191/"])?;
        Ok(out.stdout.contains("api-dc1").then_some(()))
    })?;
    ask(9191)?;
    step("done: stopping everything and removing the namespaces")?;
    Ok(())
}

/// A successful command's output, to print with [`show`].
fn ok_output(stdout: String) -> Output {
    Output {
        status: Some(std::os::unix::process::ExitStatusExt::from_raw(0)),
        stdout,
        stderr: String::new(),
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("weft-demo loads eBPF programs and makes network namespaces: run it as root");
        std::process::exit(2);
    }
    catch_signals();
    let datacenters = std::env::args().any(|a| a == "--datacenters");
    println!(
        "weft demo: a service mesh without sidecars, {} on this machine.\n\
         (It cleans up after itself, also on failure or Ctrl-C.)",
        if datacenters {
            "two datacenters"
        } else {
            "two nodes"
        }
    );
    let run = if datacenters {
        datacenters_demo()
    } else {
        demo()
    };
    if let Err(e) = run {
        eprintln!("\nweft demo failed: {e:#}");
        std::process::exit(1);
    }
}
