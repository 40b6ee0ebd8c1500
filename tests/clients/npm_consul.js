// What a Node.js application using the npm `consul` package does against its
// node's agent: KV (set, get, keys, check-and-set, a blocking read woken by a
// write, delete) and the catalog (services, one service's instances, nodes).
//
// Run by tests/tests/consul_clients.rs inside a mesh node, with the agent's
// local API at 127.0.0.1:8500. Arguments: a token, the name of a service the
// mesh runs, and the node's name. Every step asserts; the last line printed
// is a JSON summary the Rust test checks again.
"use strict";
const assert = require("node:assert/strict");
const Consul = require("consul");

const [token, service, node] = process.argv.slice(2);
const consul = new Consul({ host: "127.0.0.1", port: 8500, defaults: { token } });

async function main() {
  const out = {};
  assert.equal(await consul.kv.set("js/greeting", "hello"), true);
  const first = await consul.kv.get("js/greeting");
  assert.equal(first.Value, "hello");
  assert.equal(await consul.kv.set({ key: "js/greeting", value: "hi", cas: first.ModifyIndex }), true);
  // Consul answers a failed check-and-set with `false`, which this client
  // (papi's middleware) hands back as undefined: not true, and nothing written.
  const late = await consul.kv.set({ key: "js/greeting", value: "late", cas: first.ModifyIndex });
  assert.notEqual(late, true);
  assert.equal((await consul.kv.get("js/greeting")).Value, "hi");
  await consul.kv.set("js/other", "x");
  out.keys = await consul.kv.keys("js/");

  // A watch (blocking reads on X-Consul-Index): the current value first,
  // then the write that wakes it.
  const seen = [];
  const watch = consul.watch({ method: consul.kv.get, options: { key: "js/greeting", wait: "30s" } });
  const woken = new Promise((resolve, reject) => {
    watch.on("change", (data) => {
      // Another write to the cluster may wake it with the same value.
      if (seen.at(-1) === data.Value) return;
      seen.push(data.Value);
      if (seen.length === 1) {
        consul.kv.set("js/greeting", "woken").catch(reject);
      } else if (data.Value === "woken") {
        resolve();
      }
    });
    watch.on("error", reject);
  });
  const timer = setTimeout(() => watch.emit("error", new Error(`watch saw only ${JSON.stringify(seen)}`)), 30000);
  await woken;
  clearTimeout(timer);
  watch.end();
  out.watched = seen;
  assert.equal(await consul.kv.del("js/other"), true);
  assert.equal(await consul.kv.get("js/other"), undefined);

  const services = await consul.catalog.service.list();
  assert.ok(Object.hasOwn(services, service), JSON.stringify(services));
  const instances = await consul.catalog.service.nodes(service);
  out.instances = instances.map((i) => ({ node: i.Node, service: i.ServiceName, port: i.ServicePort }));
  const nodes = await consul.catalog.node.list();
  out.nodes = nodes.map((n) => n.Node).sort();
  assert.ok(out.nodes.includes(node), JSON.stringify(nodes));

  // Without a token, nothing.
  const anonymous = new Consul({ host: "127.0.0.1", port: 8500 });
  await assert.rejects(anonymous.kv.get("js/greeting"), (e) => e.statusCode === 403);
  out.anonymous = "refused";
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
