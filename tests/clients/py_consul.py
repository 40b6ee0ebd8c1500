"""What a Python application using py-consul does against its node's agent.

Run by tests/tests/consul_clients.rs inside a mesh node, with the agent's
local API at 127.0.0.1:8500. Arguments: a management token, a token that may
only read keys under "nothing/", and the node's name. Every step asserts;
the last line printed is a JSON summary the Rust test checks again.
"""
import json
import sys
import threading
import time

import consul
from consul.callback import CB

token, weak_token, node = sys.argv[1:4]
c = consul.Consul(host="127.0.0.1", port=8500, token=token)
out = {}


def until(what, seconds, probe):
    """probe() until it returns something true, at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {seconds}s"
        time.sleep(0.2)


# The agent and its node. py-consul 1.8's agent.self() and members() send
# no token (a Consul agent with default-deny ACLs refuses them too, unless
# it has a default token), so they go through its HTTP layer with one.
me = c.http.get(CB.json(), "/v1/agent/self", headers=c.prepare_headers())
assert me["Config"]["NodeName"] == node, me
out["datacenter"] = me["Config"]["Datacenter"]
members = c.http.get(CB.json(), "/v1/agent/members", headers=c.prepare_headers())
out["members"] = sorted(m["Name"] for m in members)
try:
    c.agent.self()
    raise AssertionError("agent.self() without a token was answered")
except consul.ACLPermissionDenied:
    pass

# A service with a TTL check, registered through the agent and reported on.
c.agent.service.register(
    "pyapp", service_id="pyapp-1", port=9100, tags=["py"], check=consul.Check.ttl("60s")
)
assert "pyapp-1" in c.agent.services(), c.agent.services()
c.agent.check.ttl_pass("service:pyapp-1", "all good")
_, passing = until(
    "pyapp passing in the catalog", 30, lambda: (lambda r: r if r[1] else None)(c.health.service("pyapp", passing=True))
)
out["pyapp"] = {
    "node": passing[0]["Node"]["Node"],
    "port": passing[0]["Service"]["Port"],
    "tags": passing[0]["Service"]["Tags"],
    "checks": [(k["Status"], k["Output"]) for k in passing[0]["Checks"]],
}
_, services = c.catalog.services()
assert "pyapp" in services, services
assert c.agent.checks()["service:pyapp-1"]["Status"] == "passing"

# A check added to pyapp-1 (its service's checks start over, as the TTL
# ones are told), reported on, seen by the agent, and removed.
assert c.agent.check.register(
    "pyapp beat", check=consul.Check.ttl("60s"), check_id="pyapp-beat",
    notes="from python", service_id="pyapp-1",
) is True
c.agent.check.ttl_pass("pyapp-beat", "beating")
c.agent.check.ttl_pass("service:pyapp-1", "all good")
beat = c.agent.checks()["pyapp-beat"]
out["check"] = {"name": beat["Name"], "notes": beat["Notes"], "service": beat["ServiceID"]}
until("pyapp passing with its beat", 30, lambda: any(
    "beating" in k["Output"] for k in c.health.checks("pyapp")[1] if k["CheckID"] == "service:pyapp-1"
))
try:
    c.agent.check.register("disk", check=consul.Check.ttl("60s"))
    raise AssertionError("a node-level check was accepted")
except consul.ConsulException as e:
    out["node_check"] = "not supported by weft yet" in str(e)
assert c.agent.check.deregister("pyapp-beat") is True
assert "pyapp-beat" not in c.agent.checks()

# A leaf certificate for pyapp (the key made by the agent for this call).
leaf = c.agent.connect.ca.leaf("pyapp")
out["leaf"] = {
    "service": leaf["Service"],
    "uri": leaf["ServiceURI"].split("/", 3)[3],
    "key": "PRIVATE KEY" in leaf["PrivateKeyPEM"],
    "cert": leaf["CertPEM"].startswith("-----BEGIN CERTIFICATE-----"),
}

# KV: put, get, check-and-set, and a blocking query woken by a write.
assert c.kv.put("py/config", "one") is True
index, item = c.kv.get("py/config")
assert item["Value"] == b"one", item
assert c.kv.put("py/config", "two", cas=item["ModifyIndex"]) is True
assert c.kv.put("py/config", "three", cas=item["ModifyIndex"]) is False
index, item = c.kv.get("py/config")
assert item["Value"] == b"two", item
woken = {}


def block():
    woken["reply"] = c.kv.get("py/config", index=index, wait="30s")


waiter = threading.Thread(target=block)
waiter.start()
assert c.kv.put("py/config", "four") is True
waiter.join(40)
assert not waiter.is_alive(), "the blocking query never came back"
new_index, new_item = woken["reply"]
assert new_index > index and new_item["Value"] == b"four", woken
out["kv"] = new_item["Value"].decode()

# Sessions and a lock (leader election): one holder at a time.
first = c.session.create(name="py-leader", ttl=10, lock_delay=0)
second = c.session.create(name="py-standby", lock_delay=0)
assert c.kv.put("py/leader", "first", acquire=first) is True
assert c.kv.put("py/leader", "second", acquire=second) is False
_, info = c.session.info(first)
assert info["Node"] == node and info["TTL"] == "10s", info
c.session.renew(first)
_, held = c.kv.get("py/leader")
assert held["Session"] == first, held
assert c.kv.put("py/leader", "", release=first) is True
assert c.kv.put("py/leader", "second", acquire=second) is True
c.session.destroy(first)
_, gone = c.session.info(first)
assert gone is None, gone
_, listed = c.session.list()
out["sessions"] = sorted(s["Name"] for s in listed)
c.session.destroy(second)
_, released = c.kv.get("py/leader")
out["lock"] = {"value": released["Value"].decode(), "session": released.get("Session") or "", "lock_index": released["LockIndex"]}

# An external node (no agent runs it), as consul-esm or Terraform register
# one: its service found in the catalog and by health, then removed.
assert c.catalog.register(
    "db-host", "10.9.0.5",
    service={"Service": "postgres", "ID": "pg-1", "Port": 5432, "Tags": ["primary"]},
    check={"Name": "pg alive", "CheckID": "pg-alive", "ServiceID": "pg-1", "Status": "passing"},
) is True
# (py-consul sends node_meta as `?node-meta=` query parameters, which
# Consul's register ignores; weft refuses them rather than ignore them.)
_, pg = c.health.service("postgres", passing=True)
out["external"] = {
    "node": pg[0]["Node"]["Node"],
    "address": pg[0]["Service"]["Address"] or pg[0]["Node"]["Address"],
    "external": pg[0]["Node"]["Meta"].get("external-node"),
}
try:
    c.catalog.register(node, "10.9.0.9")
    raise AssertionError("an agent's node was taken over through the catalog API")
except consul.ConsulException as e:
    out["agent_node_register"] = "refused" if "run by a weft agent" in str(e) else str(e)
assert c.catalog.deregister("db-host", service_id="pg-1") is True
assert c.health.service("postgres")[1] == []
assert c.catalog.deregister("db-host") is True
assert "db-host" not in [n["Node"] for n in c.catalog.nodes()[1]]

# A recursive delete takes the tree and nothing beside it.
c.kv.put("py/tree/1", "x")
c.kv.put("py/tree/2", "y")
c.kv.put("py/treehouse", "z")
assert c.kv.delete("py/tree/", recurse=True) is True
assert c.kv.get("py/tree/", recurse=True)[1] is None
out["tree_kept"] = c.kv.get("py/treehouse")[1]["Value"].decode()
c.kv.delete("py/treehouse")

# Intentions.
assert c.connect.intentions.upsert("web", "pyapp", action="deny") is True
out["web_to_pyapp_allowed"] = c.connect.intentions.check("web", "pyapp")
assert c.connect.intentions.delete("web", "pyapp") is True

# ACL tokens: the client's own, and a weak one refused.
out["token_self_policies"] = len(c.acl.token.read_self().get("Policies") or [])
weak = consul.Consul(host="127.0.0.1", port=8500, token=weak_token)
try:
    weak.kv.put("py/config", "stolen")
    raise AssertionError("a token without key write wrote a key")
except consul.ACLPermissionDenied:
    out["weak_write"] = "refused"
assert c.kv.get("py/config")[1]["Value"] == b"four"

c.agent.service.deregister("pyapp-1")
until("pyapp gone from the catalog", 30, lambda: c.health.service("pyapp")[1] == [])
print(json.dumps(out))
