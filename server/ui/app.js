// weft web UI: one static script, no libraries, no build step.
//
// Sections: state · dom helpers · api · formatting · router & live refresh ·
// login · pages (services, service, topology, intentions, nodes, kv) ·
// topology layout.
//
// Security rules kept throughout: every server-provided string reaches the
// DOM through textContent / createTextNode / setAttribute (never innerHTML),
// no inline styles or handlers (the page runs under a strict CSP), and the
// ACL token lives only in sessionStorage and the X-Consul-Token header.
(function () {
  'use strict';

  // ───────────────────────────── state ─────────────────────────────

  const TOKEN_KEY = 'weft-token';
  const REFRESH_MS = 2000;
  const SVGNS = 'http://www.w3.org/2000/svg';

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || '',
    gen: 0,          // bumped on every page change; stale async work checks it
    timers: [],      // intervals of the current page
    topo: null,      // topology graph kept between refreshes (in-place updates)
  };

  const $ = (sel, root) => (root || document).querySelector(sel);

  // ─────────────────────────── dom helpers ──────────────────────────

  // Properties set as DOM properties rather than attributes.
  const PROPS = new Set(['value', 'checked', 'disabled', 'readOnly', 'selected']);

  function setAttrs(el, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on')) {
        if (typeof v === 'function') el.addEventListener(k.slice(2), v);
        continue; // never an inline handler attribute
      }
      if (k === 'style') continue; // CSP: no style attributes
      if (k === 'class') el.setAttribute('class', Array.isArray(v) ? v.filter(Boolean).join(' ') : v);
      else if (PROPS.has(k)) el[k] = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function appendAll(el, children) {
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      if (Array.isArray(c)) appendAll(el, c);
      else if (c instanceof Node) el.appendChild(c);
      else el.appendChild(document.createTextNode(String(c)));
    }
  }

  /** h('tag', {attrs}, ...children): an HTML element; strings become text nodes. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  /** svg('tag', {attrs}, ...children): an SVG element. */
  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVGNS, tag);
    setAttrs(el, attrs);
    appendAll(el, children);
    return el;
  }

  const chip = (status, text) => h('span', { class: 'chip status-' + status }, text === undefined ? status : text);

  function showError(msg) {
    const el = $('#error');
    el.textContent = msg;
    el.classList.remove('hidden');
  }
  function clearError() {
    const el = $('#error');
    el.textContent = '';
    el.classList.add('hidden');
  }

  // ────────────────────────────── api ──────────────────────────────

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /**
   * One call to the server. The token goes in X-Consul-Token, never the URL.
   * opts.allow404: a 404 answers null. opts.token: use this token (login).
   * opts.noRedirect: an unknown token's 403 is thrown to the caller instead
   * of showing login.
   * A string body is sent as it is (KV values); anything else as JSON.
   */
  async function api(method, path, body, opts) {
    opts = opts || {};
    const headers = { 'X-Consul-Token': opts.token !== undefined ? opts.token : state.token };
    const init = { method, headers, cache: 'no-store', credentials: 'same-origin' };
    if (body !== undefined) {
      if (typeof body === 'string') {
        init.body = body;
      } else {
        init.body = JSON.stringify(body);
        headers['Content-Type'] = 'application/json';
      }
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, 'cannot reach the server: ' + e.message);
    }
    const text = await res.text();
    let data = null;
    if (text !== '') {
      try { data = JSON.parse(text); } catch (_) { data = text; }
    }
    if (res.ok) return data;
    if (res.status === 404 && opts.allow404) return null;
    const msg = typeof data === 'string' && data !== '' ? data : res.status + ' ' + res.statusText;
    const err = new ApiError(res.status, msg);
    // Only a token the server does not know logs out; a token that lacks
    // one right keeps its session and the page says what was refused.
    if (res.status === 403 && !opts.noRedirect && /^(ACL token not found|no ACL token)/.test(msg)) {
      err.loggedOut = true;
      forbidden(msg);
    }
    throw err;
  }

  const enc = encodeURIComponent;
  const q = (params) => Object.entries(params)
    .filter(([, v]) => v !== undefined && v !== null && v !== '')
    .map(([k, v]) => enc(k) + '=' + enc(v)).join('&');
  /** KV keys keep their slashes in paths and routes; each segment is encoded. */
  const encKey = (key) => {
    // A browser resolves "." and ".." in a URL's path (even encoded): such a
    // key would name another resource. The server refuses them as keys.
    if (key.split('/').some((seg) => seg === '.' || seg === '..')) {
      throw new ApiError(400, 'key ' + JSON.stringify(key) + ': "." and ".." segments are not allowed');
    }
    return key.split('/').map(enc).join('/');
  };

  // ─────────────────────────── formatting ───────────────────────────

  const pad2 = (n) => String(n).padStart(2, '0');
  const clock = (d) => pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
  const hhmm = (d) => pad2(d.getHours()) + ':' + pad2(d.getMinutes());
  const fixed1 = (x) => (Number(x) || 0).toFixed(1);
  const byName = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

  const STATUS_RANK = { passing: 0, warning: 1, critical: 2 };
  /** The worst of a list of check statuses (unknown values count as critical). */
  function worst(statuses) {
    let w = 'passing';
    for (const s of statuses) {
      const r = STATUS_RANK[s] === undefined ? 2 : STATUS_RANK[s];
      if (r > STATUS_RANK[w]) w = r === 2 ? 'critical' : 'warning';
    }
    return w;
  }

  /** Services list: the worst status over the service's instances. */
  function serviceStatus(s) {
    if (s.ChecksCritical > 0) return 'critical';
    if (s.ChecksWarning > 0) return 'warning';
    return 'passing';
  }

  /** Topology: critical when every instance is critical, warning when any is off. */
  function topoHealth(s) {
    if (!s.InstanceCount) return 'none';
    if (s.ChecksCritical > 0 && s.ChecksCritical === s.InstanceCount) return 'critical';
    if (s.ChecksWarning > 0 || s.ChecksCritical > 0) return 'warning';
    return 'passing';
  }

  /** The rate that an edge's data-rps shows: requests/s, else connections/s. */
  const edgeRate = (e) => (e.RequestsPerSec > 0 ? e.RequestsPerSec : (e.ConnectionsPerSec || 0));

  function edgeClass(e) {
    if (e.Allowed === false || (e.Denied > 0 && !(e.RequestsPerSec > 0) && !(e.ConnectionsPerSec > 0))) return 'edge-refused';
    if (e.ErrorRate > 0.05) return 'edge-errors';
    return 'edge-ok';
  }

  function edgeMetrics(e) {
    const unit = e.RequestsPerSec > 0 ? ' rps' : (e.ConnectionsPerSec > 0 ? ' c/s' : ' rps');
    return fixed1(edgeRate(e)) + unit + ' · ' + fixed1((e.ErrorRate || 0) * 100) + '% err · p99 ' +
      Math.round(e.P99Ms || 0) + ' ms';
  }

  function edgeLabel(e, cls) {
    if (cls === 'edge-refused') return 'refused' + (e.Denied > 0 ? ' · ' + e.Denied + ' denied' : '');
    return edgeMetrics(e);
  }

  // ───────────────────── router & live refresh ──────────────────────

  const serviceHref = (name) => '#/services/' + enc(name);
  const kvHref = (key) => '#/kv/' + encKey(key);

  function safeDecode(s) {
    try { return decodeURIComponent(s); } catch (_) { return s; }
  }

  function parseRoute() {
    const hash = location.hash.replace(/^#\/?/, '');
    const slash = hash.indexOf('/');
    const head = slash < 0 ? hash : hash.slice(0, slash);
    const rest = slash < 0 ? null : hash.slice(slash + 1);
    switch (head) {
      case 'services':
        return rest ? { page: 'service', nav: 'services', arg: safeDecode(rest) } : { page: 'services', nav: 'services' };
      case 'topology': return { page: 'topology', nav: 'topology' };
      case 'intentions': return { page: 'intentions', nav: 'intentions' };
      case 'nodes': return { page: 'nodes', nav: 'nodes' };
      case 'datacenters': return { page: 'datacenters', nav: 'datacenters' };
      case 'kv': return { page: 'kv', nav: 'kv', arg: safeDecode(rest || '') };
      default: return null;
    }
  }

  function stopTimers() {
    for (const t of state.timers) clearInterval(t);
    state.timers = [];
  }

  /** Each page gets a context; alive() turns false once the user moved on. */
  function newContext() {
    stopTimers();
    const gen = ++state.gen;
    return {
      alive: () => gen === state.gen && state.token !== '',
      mount: (node) => $('#app').replaceChildren(node),
    };
  }

  function markUpdated() {
    $('#last-updated').textContent = 'updated ' + clock(new Date());
  }

  /** Reports a failed call (one that logged out went to the login page). */
  function report(ctx, err) {
    if (ctx && !ctx.alive()) return;
    if (err && err.loggedOut) return;
    showError(err && err.message ? err.message : String(err));
  }

  /**
   * Runs tick now and every 2 s while the page is shown; a tick is skipped
   * while the previous one is still running, so requests never pile up.
   */
  function live(ctx, tick) {
    let running = false;
    const run = async () => {
      if (running || !ctx.alive()) return;
      running = true;
      try {
        await tick();
        if (ctx.alive()) { markUpdated(); clearError(); }
      } catch (e) {
        report(ctx, e);
      } finally {
        running = false;
      }
    };
    run();
    state.timers.push(setInterval(run, REFRESH_MS));
  }

  /** Loads once (pages that do not refresh by themselves). */
  async function once(ctx, load) {
    try {
      await load();
      if (ctx.alive()) markUpdated();
    } catch (e) {
      report(ctx, e);
    }
  }

  const PAGES = {
    services: pageServices,
    service: pageService,
    topology: pageTopology,
    intentions: pageIntentions,
    nodes: pageNodes,
    datacenters: pageDatacenters,
    kv: pageKV,
  };

  function render() {
    if (!state.token) { renderLogin(''); return; }
    const route = parseRoute();
    if (!route) { location.replace('#/topology'); return; }
    document.body.classList.remove('logged-out');
    clearError();
    for (const a of document.querySelectorAll('[data-nav]')) {
      a.classList.toggle('active', a.getAttribute('data-nav') === route.nav);
    }
    state.topo = route.page === 'topology' ? state.topo : null;
    const ctx = newContext();
    PAGES[route.page](ctx, route.arg);
  }

  // ───────────────────────────── login ─────────────────────────────

  function setWhoami(self) {
    const who = $('#whoami');
    who.textContent = self ? self.AccessorID + (self.Description ? ' — ' + self.Description : '') : '';
    if (self) who.setAttribute('title', 'token ' + self.AccessorID);
  }

  /** A 403 anywhere: forget the token and ask for one, with the reason. */
  function forbidden(msg) {
    const shown = $('#login-error');
    if (!state.token && shown) { // already asked (parallel calls): just say why
      shown.textContent = msg;
      shown.classList.toggle('hidden', !msg);
      return;
    }
    state.token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    renderLogin(msg);
  }

  function renderLogin(msg) {
    const ctx = newContext();
    state.topo = null;
    document.body.classList.add('logged-out');
    setWhoami(null);
    $('#last-updated').textContent = '';
    clearError();
    const input = h('input', { id: 'login-token', type: 'password', autocomplete: 'off', placeholder: 'secret ID', 'aria-label': 'ACL token' });
    const error = h('p', { id: 'login-error', class: msg ? 'form-error' : 'form-error hidden' }, msg || '');
    const submit = h('button', { id: 'login-submit', type: 'submit', class: 'btn btn-primary' }, 'Log in');
    const form = h('form', { class: 'login-card' },
      h('h1', null, 'weft'),
      h('p', { class: 'muted' }, 'Enter an ACL token to continue.'),
      h('label', { for: 'login-token' }, 'Token'), input, error, submit);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const token = input.value.trim();
      if (!token) { error.textContent = 'a token is required'; error.classList.remove('hidden'); return; }
      submit.disabled = true;
      try {
        const self = await api('GET', '/v1/acl/token/self', undefined, { token, noRedirect: true });
        state.token = token;
        sessionStorage.setItem(TOKEN_KEY, token);
        setWhoami(self);
        if (!parseRoute()) location.replace('#/topology'); // hashchange renders it
        else render();
      } catch (e) {
        error.textContent = e.message;
        error.classList.remove('hidden');
      } finally {
        submit.disabled = false;
      }
    });
    ctx.mount(h('div', { class: 'login-page' }, form));
    input.focus();
  }

  function logout() {
    state.token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    renderLogin('');
  }

  // ───────────────────────── page: services ─────────────────────────

  function pageServices(ctx) {
    const search = h('input', { id: 'service-search', type: 'search', placeholder: 'Search services', autocomplete: 'off' });
    const counts = h('div', { id: 'service-counts', class: 'counts' });
    const tbody = h('tbody');
    const table = h('table', { class: 'table', id: 'services-table' },
      h('thead', null, h('tr', null, h('th', null, 'Service'), h('th', { class: 'num' }, 'Instances'),
        h('th', null, 'Health'), h('th', null, 'Checks'), h('th', null, 'Tags'))),
      tbody);
    ctx.mount(h('section', { class: 'page' },
      h('div', { class: 'page-head' }, h('h1', null, 'Services'), counts),
      h('div', { class: 'toolbar' }, search), table));

    once(ctx, async () => {
      const list = (await api('GET', '/v1/internal/ui/services')) || [];
      if (!ctx.alive()) return;
      const t0 = performance.now();
      list.sort((a, b) => byName(a.Name, b.Name));
      const tally = { passing: 0, warning: 0, critical: 0 };
      const rows = [];
      const frag = document.createDocumentFragment();
      for (const s of list) {
        const st = serviceStatus(s);
        tally[st]++;
        const tr = h('tr', { 'data-service': s.Name },
          h('td', null, h('a', { href: serviceHref(s.Name) }, s.Name)),
          h('td', { class: 'num' }, s.InstanceCount || 0),
          h('td', { class: 'health status-' + st }, st),
          h('td', { class: 'checks' },
            h('span', { class: 'count count-passing', title: 'passing' }, s.ChecksPassing || 0),
            h('span', { class: 'count count-warning', title: 'warning' }, s.ChecksWarning || 0),
            h('span', { class: 'count count-critical', title: 'critical' }, s.ChecksCritical || 0)),
          h('td', { class: 'tags' }, (s.Tags || []).map((t) => h('span', { class: 'tag' }, t))));
        rows.push([String(s.Name).toLowerCase(), tr]);
        frag.appendChild(tr);
      }
      if (!list.length) frag.appendChild(h('tr', null, h('td', { colspan: 5, class: 'muted' }, 'no services')));
      tbody.appendChild(frag);
      counts.replaceChildren(
        h('span', null, list.length + ' services'),
        h('span', { class: 'count count-passing' }, tally.passing + ' passing'),
        h('span', { class: 'count count-warning' }, tally.warning + ' warning'),
        h('span', { class: 'count count-critical' }, tally.critical + ' critical'));
      const filter = () => {
        const needle = search.value.trim().toLowerCase();
        for (const [name, tr] of rows) tr.classList.toggle('hidden', needle !== '' && !name.includes(needle));
      };
      search.addEventListener('input', filter);
      filter();
      table.setAttribute('data-render-ms', Math.round(performance.now() - t0));
      table.setAttribute('data-drawn-at', Math.round(performance.now()));
    });
    search.focus();
  }

  // ────────────────────────── page: service ──────────────────────────

  const CONFIG_KINDS = ['service-defaults', 'service-router', 'service-splitter', 'service-resolver'];

  function pageService(ctx, name) {
    const instances = h('tbody');
    const upstreams = h('ul', { id: 'upstreams', class: 'edge-list' });
    const downstreams = h('ul', { id: 'downstreams', class: 'edge-list' });
    const intentions = h('div', { id: 'service-intentions' }, h('p', { class: 'muted' }, 'loading…'));
    const config = h('div', { id: 'service-config' }, h('p', { class: 'muted' }, 'loading…'));
    const traffic = h('div', { class: 'chart-box' });
    ctx.mount(h('section', { class: 'page' },
      h('div', { class: 'page-head' }, h('h1', { id: 'service-name' }, name),
        h('a', { href: '#/services', class: 'back' }, '← all services')),
      h('h2', null, 'Instances'),
      h('table', { class: 'table', id: 'instances' },
        h('thead', null, h('tr', null, ['Instance', 'Node', 'Address', 'Tags', 'Meta', 'Status', 'Checks'].map((t) => h('th', null, t)))),
        instances),
      h('div', { class: 'two-col' },
        h('div', null, h('h2', null, 'Upstreams'), upstreams),
        h('div', null, h('h2', null, 'Downstreams'), downstreams)),
      h('h2', null, 'Traffic, last hour'), traffic,
      h('div', { class: 'two-col' },
        h('div', null, h('h2', null, 'Intentions'), intentions),
        h('div', null, h('h2', null, 'Config entries'), config))));

    // Intentions and config entries change rarely: loaded once per visit.
    loadServiceIntentions(ctx, name, intentions).catch((e) => report(ctx, e));
    loadServiceConfig(ctx, name, config).catch((e) => report(ctx, e));

    const n = enc(name);
    live(ctx, async () => {
      const [health, topo, points] = await Promise.all([
        api('GET', '/v1/health/service/' + n),
        api('GET', '/v1/internal/ui/service-topology/' + n + '?window=60', undefined, { allow404: true }),
        api('GET', '/v1/internal/ui/traffic/' + n + '?window=3600&step=60', undefined, { allow404: true }),
      ]);
      if (!ctx.alive()) return;
      renderInstances(instances, health || []);
      renderEdgeList(upstreams, (topo && topo.Upstreams) || [], 'Destination');
      renderEdgeList(downstreams, (topo && topo.Downstreams) || [], 'Source');
      traffic.replaceChildren(trafficChart(points));
    });
  }

  function renderInstances(tbody, entries) {
    const rows = entries.map((en) => {
      const svc = en.Service || {};
      const node = en.Node || {};
      const checks = en.Checks || [];
      const st = worst(checks.map((c) => c.Status));
      const addr = (svc.Address || node.Address || '') + (svc.Port ? ':' + svc.Port : '');
      return h('tr', { 'data-instance': svc.ID },
        h('td', null, svc.ID),
        h('td', null, node.Node),
        h('td', { class: 'mono' }, addr),
        h('td', { class: 'tags' }, (svc.Tags || []).map((t) => h('span', { class: 'tag' }, t))),
        h('td', { class: 'tags' }, Object.entries(svc.Meta || {}).map(([k, v]) => h('span', { class: 'tag meta' }, k + '=' + v))),
        h('td', { class: 'status status-' + st }, st),
        h('td', null, h('ul', { class: 'checks-list' }, checks.map((c) =>
          h('li', { 'data-check': c.CheckID }, chip(c.Status), ' ', h('span', { class: 'mono' }, c.CheckID),
            c.Output ? h('div', { class: 'check-output' }, c.Output) : null)))));
    });
    if (!rows.length) rows.push(h('tr', null, h('td', { colspan: 7, class: 'muted' }, 'no instances')));
    tbody.replaceChildren(...rows);
  }

  function renderEdgeList(ul, edges, otherKey) {
    const sorted = edges.slice().sort((a, b) => byName(a[otherKey], b[otherKey]));
    const items = sorted.map((e) => {
      const other = e[otherKey];
      // null: the token may not read the intentions that decide.
      const allowed = e.Allowed !== false;
      const decided = e.Allowed === true || e.Allowed === false;
      return h('li', { 'data-service': other, class: edgeClass(e) },
        h('a', { href: serviceHref(other) }, other),
        h('span', { class: 'metrics' }, edgeMetrics(e) + (e.Denied > 0 ? ' · ' + e.Denied + ' denied' : '')),
        decided ? chip(allowed ? 'passing' : 'critical', allowed ? 'allowed' : 'denied') : null,
        e.Reason ? h('span', { class: 'reason muted' }, e.Reason) : null);
    });
    if (!items.length) items.push(h('li', { class: 'muted empty' }, 'none'));
    ul.replaceChildren(...items);
  }

  async function loadServiceIntentions(ctx, name, box) {
    const all = (await api('GET', '/v1/connect/intentions')) || [];
    if (!ctx.alive()) return;
    const mine = all.filter((i) => i.DestinationName === name || i.DestinationName === '*' ||
      i.SourceName === name || i.SourceName === '*');
    if (!mine.length) { box.replaceChildren(h('p', { class: 'muted' }, 'no intentions apply')); return; }
    box.replaceChildren(h('ul', { class: 'plain-list' }, mine.map((i) =>
      h('li', { 'data-intention': i.SourceName + ' => ' + i.DestinationName },
        h('span', { class: 'mono' }, i.SourceName + ' => ' + i.DestinationName), ' ',
        actionChip(i), i.Description ? h('span', { class: 'muted' }, ' ' + i.Description) : null))),
    h('a', { href: '#/intentions' }, 'manage intentions →'));
  }

  async function loadServiceConfig(ctx, name, box) {
    const entries = await Promise.all(CONFIG_KINDS.map((k) =>
      api('GET', '/v1/config/' + k + '/' + enc(name), undefined, { allow404: true })));
    if (!ctx.alive()) return;
    box.replaceChildren(...CONFIG_KINDS.map((k, i) => h('div', { class: 'config-entry', 'data-kind': k },
      h('h3', null, k),
      entries[i] ? h('pre', { class: 'json' }, JSON.stringify(entries[i], null, 2)) : h('p', { class: 'muted' }, 'none'))));
  }

  function actionChip(i) {
    if (i.Permissions && i.Permissions.length) return h('span', { class: 'chip chip-l7' }, 'L7: ' + i.Permissions.length + ' permissions');
    return chip(i.Action === 'allow' ? 'passing' : 'critical', i.Action || '?');
  }

  /** The traffic chart: requests/s per step, errors and denied in other colours. */
  function trafficChart(data) {
    const pts = (data && data.Points) || [];
    if (!pts.length) return h('p', { class: 'muted', id: 'traffic-empty' }, 'no traffic data');
    const step = data.StepSecs || 60;
    const useConns = pts.every((p) => !p.Requests) && pts.some((p) => p.Connections > 0);
    const series = [
      { cls: 'series-requests', label: useConns ? 'connections/s' : 'requests/s', v: pts.map((p) => (useConns ? p.Connections : p.Requests) / step) },
      { cls: 'series-errors', label: 'errors/s', v: pts.map((p) => (p.Errors || 0) / step) },
      { cls: 'series-denied', label: 'denied/s', v: pts.map((p) => (p.Denied || 0) / step) },
    ];
    const W = 860, H = 220, L = 52, R = 16, T = 18, B = 28;
    const max = Math.max(0.1, ...series.flatMap((s) => s.v));
    const x = (i) => L + (pts.length === 1 ? 0 : (i * (W - L - R)) / (pts.length - 1));
    const y = (v) => T + (H - T - B) * (1 - v / max);
    const g = [];
    for (const f of [0, 0.5, 1]) { // grid and y labels
      g.push(svg('line', { class: 'grid', x1: L, x2: W - R, y1: y(max * f), y2: y(max * f) }));
      g.push(svg('text', { class: 'axis', x: L - 6, y: y(max * f) + 4, 'text-anchor': 'end' }, fixed1(max * f)));
    }
    const every = Math.max(1, Math.ceil(pts.length / 8));
    for (let i = 0; i < pts.length; i += every) {
      g.push(svg('text', { class: 'axis', x: x(i), y: H - 8, 'text-anchor': 'middle' }, hhmm(new Date(pts[i].Start * 1000))));
    }
    for (const s of series.slice().reverse()) {
      const d = s.v.map((v, i) => (i ? 'L' : 'M') + x(i).toFixed(1) + ' ' + y(v).toFixed(1)).join(' ');
      g.push(svg('path', { class: 'series ' + s.cls, d }, svg('title', null, s.label)));
    }
    // The peak: the highest requests/s point, marked and labelled.
    const req = series[0].v;
    let pi = 0;
    for (let i = 1; i < req.length; i++) if (req[i] > req[pi]) pi = i;
    const px = x(pi), py = y(req[pi]);
    const anchor = px > W - 120 ? 'end' : px < L + 60 ? 'start' : 'middle';
    g.push(svg('g', { class: 'peak', 'data-value': req[pi] },
      svg('circle', { cx: px, cy: py, r: 4 }),
      svg('text', { x: px, y: Math.max(12, py - 8), 'text-anchor': anchor },
        'peak ' + fixed1(req[pi]) + (useConns ? ' c/s' : ' req/s') + ' at ' + hhmm(new Date(pts[pi].Start * 1000)))));
    return h('div', null,
      svg('svg', { id: 'traffic-chart', class: 'chart', viewBox: '0 0 ' + W + ' ' + H, width: W, height: H, role: 'img' }, g),
      h('div', { class: 'legend' }, series.map((s) => h('span', { class: 'legend-item' }, h('span', { class: 'swatch ' + s.cls }), s.label))));
  }

  // ───────────────────────── page: topology ─────────────────────────

  function pageTopology(ctx) {
    const filter = h('input', { id: 'topology-filter', type: 'search', placeholder: 'Filter services', autocomplete: 'off' });
    const stats = h('span', { id: 'topology-stats', class: 'muted' });
    const windowEl = h('span', { id: 'topology-window', class: 'muted' });
    const wrap = h('div', { class: 'graph-wrap' });
    const legend = h('div', { class: 'legend' },
      ['passing', 'warning', 'critical', 'none'].map((s) => h('span', { class: 'legend-item' }, h('span', { class: 'swatch node-swatch health-' + s }), s === 'none' ? 'no instances' : s)),
      [['edge-ok', 'ok'], ['edge-errors', 'errors > 5%'], ['edge-refused', 'refused']].map(([c, t]) =>
        h('span', { class: 'legend-item' }, h('span', { class: 'swatch edge-swatch ' + c }), t)));
    ctx.mount(h('section', { class: 'page page-wide' },
      h('div', { class: 'page-head' }, h('h1', null, 'Topology'), windowEl, stats),
      h('div', { class: 'toolbar' }, filter, legend),
      wrap));
    state.topo = null;
    const applyFilter = () => filterTopology(filter.value);
    filter.addEventListener('input', applyFilter);
    wrap.addEventListener('click', (ev) => {
      const node = ev.target.closest && ev.target.closest('g.node');
      if (!node) return;
      const name = node.getAttribute('data-service');
      // Another datacenter's service (`api@dc2`): its datacenter's page.
      location.hash = name.includes('@') ? '#/datacenters' : serviceHref(name);
    });
    live(ctx, async () => {
      const data = await api('GET', '/v1/internal/ui/topology?window=60');
      if (!ctx.alive()) return;
      const t0 = performance.now();
      const rebuilt = drawTopology(wrap, data || {});
      applyFilter();
      const ms = Math.round(performance.now() - t0);
      const g = state.topo;
      windowEl.textContent = 'window ' + ((data && data.WindowSecs) || 60) + ' s';
      stats.textContent = g.nodes.size + ' services · ' + g.edges.size + ' edges · ' +
        (rebuilt ? 'drawn' : 'updated') + ' in ' + ms + ' ms';
      g.svg.setAttribute('data-render-ms', ms);
      // Milliseconds since the page's navigation began (for the benchmark).
      g.svg.setAttribute('data-drawn-at', Math.round(performance.now()));
    });
  }

  function filterTopology(value) {
    const g = state.topo;
    if (!g) return;
    const needle = value.trim().toLowerCase();
    const match = (name) => needle === '' || name.toLowerCase().includes(needle);
    for (const [name, n] of g.nodes) n.el.classList.toggle('dim', !match(name));
    for (const e of g.edges.values()) e.el.classList.toggle('dim', !(match(e.src) || match(e.dst)));
  }

  // ──────────────────────── topology layout ─────────────────────────

  const NODE_W = 170, NODE_H = 26, COL_W = 330, ROW_H = 38, MARGIN = 24, MAX_DEPTH = 40, SCC_COLS = 4;

  /**
   * Strongly connected components (Tarjan, iterative). Components come out
   * sinks first, so the reverse of their numbering is a topological order.
   */
  function components(names, out) {
    let next = 0, count = 0;
    const idx = new Map(), low = new Map(), comp = new Map(), onStack = new Set(), stack = [];
    const open = (v, work) => {
      idx.set(v, next); low.set(v, next); next++;
      stack.push(v); onStack.add(v); work.push([v, 0]);
    };
    for (const root of names) {
      if (idx.has(root)) continue;
      const work = [];
      open(root, work);
      while (work.length) {
        const top = work[work.length - 1];
        const v = top[0], nb = out.get(v);
        if (top[1] < nb.length) {
          const w = nb[top[1]++];
          if (!idx.has(w)) open(w, work);
          else if (onStack.has(w)) low.set(v, Math.min(low.get(v), idx.get(w)));
          continue;
        }
        work.pop();
        if (work.length) {
          const u = work[work.length - 1][0];
          low.set(u, Math.min(low.get(u), low.get(v)));
        }
        if (low.get(v) === idx.get(v)) {
          let w;
          do { w = stack.pop(); onStack.delete(w); comp.set(w, count); } while (w !== v);
          count++;
        }
      }
    }
    return { comp, count };
  }

  /**
   * Depth of each node: the longest path from the sources. Cycles are broken
   * twice over: the graph of strongly connected components is a DAG (exact
   * longest path on it), and inside a component an iterative DFS that visits
   * each node once drops its back edges; a component spreads over at most
   * SCC_COLS columns, and no depth passes MAX_DEPTH.
   */
  function depths(names, out) {
    const { comp, count } = components(names, out);
    // Inside each component: DFS from its entries (names in order), back edges dropped.
    const entry = new Set();
    for (const [n, list] of out) for (const m of list) if (comp.get(m) !== comp.get(n)) entry.add(m);
    const roots = names.slice().sort((a, b) => (entry.has(b) - entry.has(a)) || byName(a, b));
    const mark = new Map(); // 1 = on the stack, 2 = done
    const post = [];
    const dag = new Map(names.map((n) => [n, []]));
    for (const r of roots) {
      if (mark.get(r)) continue;
      const stack = [[r, 0]];
      mark.set(r, 1);
      while (stack.length) {
        const top = stack[stack.length - 1];
        const nb = out.get(top[0]);
        if (top[1] < nb.length) {
          const m = nb[top[1]++];
          if (comp.get(m) !== comp.get(top[0])) continue; // between components: later
          const st = mark.get(m);
          if (st === 1) continue; // back edge: breaks the cycle
          dag.get(top[0]).push(m);
          if (!st) { mark.set(m, 1); stack.push([m, 0]); }
        } else {
          mark.set(top[0], 2);
          post.push(top[0]);
          stack.pop();
        }
      }
    }
    const sub = new Map(names.map((n) => [n, 0]));
    for (let i = post.length - 1; i >= 0; i--) { // reverse post-order: topological
      const n = post[i];
      for (const m of dag.get(n)) sub.set(m, Math.min(SCC_COLS - 1, Math.max(sub.get(m), sub.get(n) + 1)));
    }
    // Between components: exact longest path, each component as wide as its columns.
    const members = Array.from({ length: count }, () => []);
    for (const n of names) members[comp.get(n)].push(n);
    const width = members.map((ms) => 1 + Math.max(0, ...ms.map((n) => sub.get(n))));
    const start = new Array(count).fill(0);
    for (let c = count - 1; c >= 0; c--) {
      for (const n of members[c]) {
        for (const m of out.get(n)) {
          const d = comp.get(m);
          if (d !== c) start[d] = Math.max(start[d], start[c] + width[c]);
        }
      }
    }
    const depth = new Map();
    for (const n of names) depth.set(n, Math.min(MAX_DEPTH, start[comp.get(n)] + sub.get(n)));
    return depth;
  }

  /**
   * Deterministic layered layout: columns by depth (longest path from the
   * sources, see depths), rows by name; services without edges go in a
   * compact grid below.
   */
  function layout(names, edges) {
    const out = new Map();
    for (const n of names) out.set(n, []);
    for (const e of edges) if (e.src !== e.dst) out.get(e.src).push(e.dst);
    for (const list of out.values()) list.sort(byName);
    const connected = new Set();
    for (const e of edges) { connected.add(e.src); connected.add(e.dst); }
    const depth = depths(names.filter((n) => connected.has(n)), out);
    const cols = [];
    for (const n of names) {
      if (!connected.has(n)) continue;
      const d = depth.get(n) || 0;
      (cols[d] = cols[d] || []).push(n);
    }
    const pos = new Map();
    let maxRows = 0;
    cols.forEach((col, d) => {
      if (!col) return;
      col.sort(byName);
      col.forEach((n, i) => pos.set(n, { x: MARGIN + d * COL_W, y: MARGIN + 20 + i * ROW_H }));
      maxRows = Math.max(maxRows, col.length);
    });
    const graphW = Math.max(cols.length, 1) * COL_W - (COL_W - NODE_W) + MARGIN * 2;
    const lone = names.filter((n) => !connected.has(n)).sort(byName);
    const perRow = Math.max(6, Math.floor((graphW - MARGIN) / (NODE_W + 16)));
    const gridTop = MARGIN + 20 + maxRows * ROW_H + (maxRows ? 40 : 0);
    lone.forEach((n, i) => pos.set(n, {
      x: MARGIN + (i % perRow) * (NODE_W + 16),
      y: gridTop + 20 + Math.floor(i / perRow) * (NODE_H + 12),
    }));
    const width = Math.max(graphW, MARGIN * 2 + Math.min(lone.length, perRow) * (NODE_W + 16));
    const height = gridTop + 20 + Math.ceil(lone.length / perRow) * (NODE_H + 12) + MARGIN;
    return { pos, width, height, gridTop: lone.length ? gridTop : null, depthCols: cols.length };
  }

  /**
   * The path of an edge and where its label goes (the curve's midpoint).
   * Forward edges run right side to left side; edges back to an earlier or
   * the same column loop below the nodes, bottom to bottom, so they never
   * run along a row through the nodes; a self edge is a small loop.
   */
  function edgeGeometry(a, b, self) {
    if (self) {
      const x = a.x + NODE_W, y = a.y;
      return { d: `M ${x - 20} ${y} C ${x - 10} ${y - 34}, ${x + 34} ${y - 10}, ${x} ${y + 8}`, lx: x + 8, ly: y - 22 };
    }
    let p;
    if (b.x > a.x) {
      const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x - 3, y2 = b.y + NODE_H / 2;
      const bend = Math.max(60, (x2 - x1) / 2);
      p = [x1, y1, x1 + bend, y1, x2 - bend, y2, x2, y2];
    } else {
      const x1 = a.x + NODE_W / 2 - 10, y1 = a.y + NODE_H, x2 = b.x + NODE_W / 2 + 10, y2 = b.y + NODE_H + 3;
      const drop = Math.min(160, 28 + Math.abs(x2 - x1) * 0.12 + Math.abs(y2 - y1) * 0.05);
      const low = Math.max(y1, y2) + drop;
      p = [x1, y1, x1, low, x2, low, x2, y2];
    }
    const mid = (i) => (p[i] + 3 * p[i + 2] + 3 * p[i + 4] + p[i + 6]) / 8; // the cubic at t = 0.5
    return {
      d: `M ${p[0]} ${p[1]} C ${p[2]} ${p[3]}, ${p[4]} ${p[5]}, ${p[6]} ${p[7]}`,
      lx: mid(0), ly: mid(1) - 4,
    };
  }

  const shortName = (n) => (n.length > 24 ? n.slice(0, 23) + '…' : n);
  const nodeTitle = (s) => `${s.Name}: ${s.InstanceCount || 0} instances, ${s.ChecksPassing || 0} passing, ` +
    `${s.ChecksWarning || 0} warning, ${s.ChecksCritical || 0} critical`;

  /**
   * Draws the graph, or updates it in place when the same services and edges
   * come back (classes, labels, rates only). Returns true when rebuilt.
   */
  function drawTopology(wrap, data) {
    const services = new Map();
    for (const s of data.Services || []) services.set(s.Name, s);
    const edges = new Map();
    for (const e of data.Edges || []) {
      const key = e.Source + '\u0000' + e.Destination;
      if (edges.has(key)) continue;
      for (const n of [e.Source, e.Destination]) {
        if (!services.has(n)) services.set(n, { Name: n, InstanceCount: 0 });
      }
      edges.set(key, e);
    }
    const names = [...services.keys()].sort(byName);
    const sig = names.join('\n') + '\u0001' + [...edges.keys()].sort(byName).join('\n');
    const g = state.topo;
    if (g && g.sig === sig && wrap.contains(g.svg)) {
      for (const [name, s] of services) {
        const n = g.nodes.get(name);
        n.el.setAttribute('class', 'node health-' + topoHealth(s) + (name.includes('@') ? ' remote' : ''));
        n.title.textContent = nodeTitle(s);
      }
      for (const [key, e] of edges) {
        const el = g.edges.get(key);
        const cls = edgeClass(e);
        el.el.setAttribute('class', 'edge ' + cls);
        el.el.setAttribute('data-rps', edgeRate(e));
        el.path.setAttribute('marker-end', 'url(#arrow-' + cls + ')');
        el.label.textContent = edgeLabel(e, cls);
        el.title.textContent = e.Source + ' → ' + e.Destination + (e.Reason ? ': ' + e.Reason : '');
      }
      return false;
    }

    const lay = layout(names, [...edges.values()].map((e) => ({ src: e.Source, dst: e.Destination })));
    const topo = { sig, nodes: new Map(), edges: new Map(), svg: null };
    const frag = document.createDocumentFragment();
    const defs = svg('defs', null, ['edge-ok', 'edge-errors', 'edge-refused'].map((c) =>
      svg('marker', { id: 'arrow-' + c, class: 'arrow ' + c, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto' },
        svg('path', { d: 'M0,0 L10,5 L0,10 z' }))));
    frag.appendChild(defs);
    if (lay.gridTop !== null) {
      frag.appendChild(svg('text', { class: 'section-label', x: MARGIN, y: lay.gridTop + 8 }, 'services without traffic'));
    }
    const edgeLayer = svg('g', { class: 'edges' });
    for (const [key, e] of edges) {
      const cls = edgeClass(e);
      const geo = edgeGeometry(lay.pos.get(e.Source), lay.pos.get(e.Destination), e.Source === e.Destination);
      const title = svg('title', null, e.Source + ' → ' + e.Destination + (e.Reason ? ': ' + e.Reason : ''));
      const path = svg('path', { class: 'edge-path', d: geo.d, 'marker-end': 'url(#arrow-' + cls + ')' });
      const label = svg('text', { class: 'edge-label', x: geo.lx, y: geo.ly, 'text-anchor': 'middle' }, edgeLabel(e, cls));
      const el = svg('g', { class: 'edge ' + cls, 'data-source': e.Source, 'data-destination': e.Destination, 'data-rps': edgeRate(e) },
        title, path, label);
      edgeLayer.appendChild(el);
      topo.edges.set(key, { el, path, label, title, src: e.Source, dst: e.Destination });
    }
    frag.appendChild(edgeLayer);
    const nodeLayer = svg('g', { class: 'nodes' });
    for (const name of names) {
      const s = services.get(name);
      const p = lay.pos.get(name);
      const title = svg('title', null, nodeTitle(s));
      const remote = name.includes('@');
      const el = svg('g', { class: 'node health-' + topoHealth(s) + (remote ? ' remote' : ''), 'data-service': name, transform: `translate(${p.x},${p.y})` },
        title,
        svg('rect', { width: NODE_W, height: NODE_H, rx: 6, ry: 6 }),
        svg('circle', { class: 'dot', cx: 13, cy: NODE_H / 2, r: 4.5 }),
        svg('text', { x: 24, y: NODE_H / 2 + 4 }, shortName(remote ? name.replace('@', ' · ') : name)));
      nodeLayer.appendChild(el);
      topo.nodes.set(name, { el, title });
    }
    frag.appendChild(nodeLayer);
    const root = svg('svg', { id: 'topology-graph', width: lay.width, height: lay.height, viewBox: `0 0 ${lay.width} ${lay.height}` });
    root.appendChild(frag);
    topo.svg = root;
    if (!names.length) wrap.replaceChildren(h('p', { class: 'muted' }, 'no services'), root);
    else wrap.replaceChildren(root);
    state.topo = topo;
    return true;
  }

  // ──────────────────────── page: intentions ────────────────────────

  function pageIntentions(ctx) {
    const tbody = h('tbody');
    const form = intentionForm(ctx, () => reload());
    const checker = intentionChecker();
    ctx.mount(h('section', { class: 'page' },
      h('div', { class: 'page-head' }, h('h1', null, 'Intentions')),
      h('table', { class: 'table', id: 'intentions-table' },
        h('thead', null, h('tr', null, ['Source', 'Destination', 'Action', 'Description', ''].map((t) => h('th', null, t)))),
        tbody),
      h('div', { class: 'two-col' }, form.el, checker)));

    const reload = () => once(ctx, async () => {
      const list = (await api('GET', '/v1/connect/intentions')) || [];
      if (!ctx.alive()) return;
      const rows = list.map((i) => {
        const label = i.SourceName + ' => ' + i.DestinationName;
        return h('tr', { 'data-intention': label },
          h('td', null, i.SourceName), h('td', null, i.DestinationName),
          h('td', null, actionChip(i)),
          h('td', null, i.Description || ''),
          h('td', { class: 'actions' },
            h('button', { type: 'button', class: 'btn btn-small intention-edit', onclick: () => form.load(i) }, 'Edit'),
            h('button', { type: 'button', class: 'btn btn-small btn-danger intention-delete', onclick: () => del(i, label) }, 'Delete')));
      });
      if (!rows.length) rows.push(h('tr', null, h('td', { colspan: 5, class: 'muted' }, 'no intentions')));
      tbody.replaceChildren(...rows);
    });

    async function del(i, label) {
      if (!confirm('Delete the intention ' + label + '?')) return;
      try {
        await api('DELETE', '/v1/connect/intentions/exact?' + q({ source: i.SourceName, destination: i.DestinationName }));
        reload();
      } catch (e) { report(ctx, e); }
    }
    reload();
  }

  /** The create/edit form, with its L7 permissions editor. */
  function intentionForm(ctx, saved) {
    const src = h('input', { id: 'intention-source', type: 'text', placeholder: 'web or *', autocomplete: 'off' });
    const dst = h('input', { id: 'intention-destination', type: 'text', placeholder: 'api or *', autocomplete: 'off' });
    const action = h('select', { id: 'intention-action' }, ['allow', 'deny', 'l7'].map((v) => h('option', { value: v }, v)));
    const desc = h('input', { id: 'intention-description', type: 'text', autocomplete: 'off' });
    const perms = h('div', { id: 'intention-permissions', class: 'perm-rows' });
    const addBtn = h('button', { type: 'button', id: 'intention-add-permission', class: 'btn btn-small', onclick: () => perms.appendChild(permRow()) }, '+ permission');
    const l7 = h('div', { id: 'intention-l7', class: 'l7-editor hidden' }, h('h3', null, 'L7 permissions (first match wins)'), perms, addBtn);
    const error = h('p', { id: 'intention-error', class: 'form-error hidden' });
    const title = h('h2', null, 'New intention');
    const save = h('button', { id: 'intention-save', type: 'submit', class: 'btn btn-primary' }, 'Save');
    const reset = h('button', { type: 'button', class: 'btn', onclick: () => clear() }, 'Clear');
    const el = h('form', { id: 'intention-form', class: 'card' }, title,
      h('div', { class: 'form-grid' },
        h('label', { for: 'intention-source' }, 'Source'), src,
        h('label', { for: 'intention-destination' }, 'Destination'), dst,
        h('label', { for: 'intention-action' }, 'Action'), action,
        h('label', { for: 'intention-description' }, 'Description'), desc),
      l7, error, h('div', { class: 'buttons' }, save, reset));

    const syncL7 = () => {
      l7.classList.toggle('hidden', action.value !== 'l7');
      if (action.value === 'l7' && !perms.children.length) perms.appendChild(permRow());
    };
    action.addEventListener('change', syncL7);
    const showErr = (msg) => { error.textContent = msg; error.classList.toggle('hidden', !msg); };

    function clear() {
      src.value = dst.value = desc.value = '';
      action.value = 'allow';
      perms.replaceChildren();
      title.textContent = 'New intention';
      showErr('');
      syncL7();
    }

    function load(i) {
      src.value = i.SourceName || '';
      dst.value = i.DestinationName || '';
      desc.value = i.Description || '';
      const isL7 = !!(i.Permissions && i.Permissions.length);
      action.value = isL7 ? 'l7' : (i.Action === 'deny' ? 'deny' : 'allow');
      perms.replaceChildren(...(isL7 ? i.Permissions.map(permRow) : []));
      title.textContent = 'Edit ' + i.SourceName + ' => ' + i.DestinationName;
      showErr('');
      syncL7();
      el.scrollIntoView({ block: 'nearest' });
    }

    el.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const s = src.value.trim(), d = dst.value.trim();
      if (!s || !d) { showErr('source and destination are required'); return; }
      const body = { Description: desc.value };
      if (action.value === 'l7') body.Permissions = [...perms.children].map(readPermRow);
      else body.Action = action.value;
      save.disabled = true;
      try {
        await api('PUT', '/v1/connect/intentions/exact?' + q({ source: s, destination: d }), body);
        if (!ctx.alive()) return;
        clear();
        saved();
      } catch (e) {
        if (!e.loggedOut) showErr(e.message);
      } finally {
        save.disabled = false;
      }
    });
    syncL7();
    return { el, load };
  }

  const HEADER_TYPES = ['present', 'exact', 'prefix', 'suffix', 'regex'];
  const HEADER_FIELDS = { exact: 'Exact', prefix: 'Prefix', suffix: 'Suffix', regex: 'Regex' };
  const PATH_FIELDS = { exact: 'PathExact', prefix: 'PathPrefix', regex: 'PathRegex' };

  /** One L7 permission row; p fills it from an existing permission. */
  function permRow(p) {
    p = p || {};
    const http = p.HTTP || {};
    const hdr = (http.Header && http.Header[0]) || {};
    const pathType = http.PathPrefix ? 'prefix' : http.PathRegex ? 'regex' : 'exact';
    const hdrType = hdr.Present ? 'present' : (Object.keys(HEADER_FIELDS).find((t) => hdr[HEADER_FIELDS[t]]) || 'present');
    const sel = (cls, values, value) => h('select', { class: cls }, values.map((v) => h('option', { value: v, selected: v === value }, v)));
    const row = h('div', { class: 'perm-row' },
      sel('perm-action', ['allow', 'deny'], p.Action === 'deny' ? 'deny' : 'allow'),
      sel('perm-path-type', ['exact', 'prefix', 'regex'], pathType),
      h('input', { class: 'perm-path', type: 'text', placeholder: 'path', value: http[PATH_FIELDS[pathType]] || '' }),
      h('input', { class: 'perm-methods', type: 'text', placeholder: 'GET, POST', value: (http.Methods || []).join(', ') }),
      h('input', { class: 'perm-header-name', type: 'text', placeholder: 'header', value: hdr.Name || '' }),
      sel('perm-header-type', HEADER_TYPES, hdrType),
      h('input', { class: 'perm-header-value', type: 'text', placeholder: 'value', value: hdr[HEADER_FIELDS[hdrType]] || '' }),
      h('label', { class: 'inline' }, h('input', { class: 'perm-header-invert', type: 'checkbox', checked: !!hdr.Invert }), 'invert'),
      h('button', { type: 'button', class: 'btn btn-small perm-remove', title: 'remove', onclick: () => row.remove() }, '×'));
    // The form edits one header match; any further ones are kept as they
    // are (never dropped by an edit) and said to be there.
    const extra = (http.Header || []).slice(1);
    row.extraHeaders = extra;
    if (extra.length) {
      row.appendChild(h('span', { class: 'muted perm-extra' },
        '+ ' + extra.length + ' more header match' + (extra.length > 1 ? 'es' : '') + ' (kept; edit them with the CLI): ' +
        extra.map((m) => m.Name).join(', ')));
    }
    return row;
  }

  function readPermRow(row) {
    const val = (cls) => $('.' + cls, row).value.trim();
    const http = {};
    if (val('perm-path')) http[PATH_FIELDS[val('perm-path-type')]] = val('perm-path');
    const methods = val('perm-methods').split(',').map((m) => m.trim().toUpperCase()).filter(Boolean);
    if (methods.length) http.Methods = methods;
    if (val('perm-header-name')) {
      const type = val('perm-header-type');
      const hm = { Name: val('perm-header-name') };
      if (type === 'present') hm.Present = true;
      else hm[HEADER_FIELDS[type]] = val('perm-header-value');
      if ($('.perm-header-invert', row).checked) hm.Invert = true;
      http.Header = [hm];
    }
    if (row.extraHeaders && row.extraHeaders.length) {
      http.Header = (http.Header || []).concat(row.extraHeaders);
    }
    return { Action: val('perm-action'), HTTP: http };
  }

  /** "Would this be allowed?" */
  function intentionChecker() {
    const input = (id, ph) => h('input', { id, type: 'text', placeholder: ph, autocomplete: 'off' });
    const src = input('check-source', 'web'), dst = input('check-destination', 'api');
    const method = input('check-method', 'GET (optional)'), path = input('check-path', '/path (optional)');
    const result = h('div', { id: 'check-result', class: 'check-result' });
    const btn = h('button', { id: 'check-submit', type: 'submit', class: 'btn btn-primary' }, 'Check');
    const form = h('form', { id: 'check-form', class: 'card' }, h('h2', null, 'Check a connection'),
      h('div', { class: 'form-grid' },
        h('label', { for: 'check-source' }, 'Source'), src,
        h('label', { for: 'check-destination' }, 'Destination'), dst,
        h('label', { for: 'check-method' }, 'Method'), method,
        h('label', { for: 'check-path' }, 'Path'), path),
      h('div', { class: 'buttons' }, btn), result);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      result.replaceChildren();
      result.removeAttribute('data-allowed');
      btn.disabled = true;
      try {
        const r = await api('GET', '/v1/connect/intentions/check?' + q({
          source: src.value.trim(), destination: dst.value.trim(), method: method.value.trim(), path: path.value.trim(),
        }));
        const ok = !!(r && r.Allowed);
        result.setAttribute('data-allowed', ok);
        result.replaceChildren(chip(ok ? 'passing' : 'critical', ok ? 'allowed' : 'denied'), ' ',
          h('span', { class: 'reason' }, (r && r.Reason) || ''));
      } catch (e) {
        if (!e.loggedOut) result.replaceChildren(h('span', { class: 'form-error' }, e.message));
      } finally {
        btn.disabled = false;
      }
    });
    return form;
  }

  // ─────────────────────────── page: nodes ───────────────────────────

  function pageNodes(ctx) {
    const tbody = h('tbody');
    ctx.mount(h('section', { class: 'page' },
      h('div', { class: 'page-head' }, h('h1', null, 'Nodes')),
      h('table', { class: 'table', id: 'nodes-table' },
        h('thead', null, h('tr', null, ['Node', 'Address', 'Datacenter', 'Status', 'Output', 'Services'].map((t) => h('th', null, t)))),
        tbody)));
    once(ctx, async () => {
      const list = ((await api('GET', '/v1/internal/ui/nodes')) || []).sort((a, b) => byName(a.Node, b.Node));
      if (!ctx.alive()) return;
      const svcName = (s) => (typeof s === 'string' ? s : (s && (s.Service || s.Name || s.ID)) || '');
      const frag = document.createDocumentFragment();
      for (const n of list) {
        const st = STATUS_RANK[n.Status] === undefined ? 'critical' : n.Status;
        frag.appendChild(h('tr', { 'data-node': n.Node },
          h('td', null, n.Node), h('td', { class: 'mono' }, n.Address), h('td', null, n.Datacenter || ''),
          h('td', { class: 'status status-' + st }, n.Status || 'unknown'),
          h('td', { class: 'check-output' }, n.Output || ''),
          h('td', { class: 'tags' }, (n.Services || []).map((s) => {
            const name = svcName(s);
            return h('a', { class: 'tag', href: serviceHref(name) }, name);
          }))));
      }
      if (!list.length) frag.appendChild(h('tr', null, h('td', { colspan: 6, class: 'muted' }, 'no nodes')));
      tbody.replaceChildren(frag);
    });
  }

  // ──────────────────────── page: datacenters ────────────────────────

  /** Every datacenter of the federation, with its gateways and services. */
  function pageDatacenters(ctx) {
    const body = h('div', { id: 'datacenters' });
    ctx.mount(h('section', { class: 'page' },
      h('div', { class: 'page-head' }, h('h1', null, 'Datacenters')),
      body));
    live(ctx, async () => {
      const list = (await api('GET', '/v1/internal/ui/datacenters')) || [];
      if (!ctx.alive()) return;
      const now = Date.now();
      const frag = document.createDocumentFragment();
      for (const dc of list) {
        const badges = [];
        if (dc.Primary) badges.push(h('span', { class: 'chip chip-l7' }, 'primary'));
        if (dc.Local) badges.push(h('span', { class: 'chip' }, 'this datacenter'));
        const heard = dc.Local ? '' : (dc.UpdatedMs > 0
          ? 'state last changed ' + Math.max(0, Math.round((now - dc.UpdatedMs) / 1000)) + ' s ago'
          : 'not heard from yet');
        const gateways = (dc.Gateways || []).length
          ? 'gateways ' + dc.Gateways.join(', ') : (dc.Local ? '' : 'no gateway known');
        const rows = (dc.Services || []).slice().sort((a, b) => byName(a.Name, b.Name)).map((s) => {
          const st = topoHealth(s);
          return h('tr', { 'data-service': s.Name },
            h('td', null, dc.Local ? h('a', { href: serviceHref(s.Name) }, s.Name) : s.Name),
            h('td', null, String(s.InstanceCount || 0)),
            h('td', { class: 'status status-' + (st === 'none' ? 'critical' : st) }, st === 'none' ? 'no instances' : st),
            h('td', { class: 'mono' }, s.VIP || ''));
        });
        if (!rows.length) rows.push(h('tr', null, h('td', { colspan: 4, class: 'muted' }, 'no services you may read')));
        frag.appendChild(h('div', { class: 'datacenter', 'data-datacenter': dc.Name },
          h('h2', null, dc.Name, ' ', badges),
          h('p', { class: 'muted' }, [gateways, heard].filter(Boolean).join(' · ')),
          h('table', { class: 'table' },
            h('thead', null, h('tr', null, ['Service', 'Instances', 'Health', 'Virtual IP'].map((t) => h('th', null, t)))),
            h('tbody', null, rows))));
      }
      body.replaceChildren(frag);
    });
  }

  // ──────────────────────────── page: kv ────────────────────────────

  /** Base64 to text; null when the bytes are not valid UTF-8. */
  function decodeValue(b64) {
    const bin = atob(b64 || '');
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    try {
      return { text: new TextDecoder('utf-8', { fatal: true }).decode(bytes), size: bytes.length };
    } catch (_) {
      return { text: null, size: bytes.length };
    }
  }

  function pageKV(ctx, path) {
    // A route ending in "/" (or empty) is a folder; anything else is a key
    // shown in the editor next to its folder.
    if (path.split('/').some((seg) => seg === '.' || seg === '..')) {
      ctx.mount(h('section', { class: 'page' }, h('h1', null, 'Key/Value'),
        h('p', { class: 'form-error' }, 'A key with a "." or ".." segment is not allowed.')));
      return;
    }
    const isFolder = path === '' || path.endsWith('/');
    const folder = isFolder ? path : path.slice(0, path.lastIndexOf('/') + 1);
    const key = isFolder ? null : path;

    const crumbs = [h('a', { href: '#/kv/' }, 'root')];
    let acc = '';
    for (const part of folder.split('/').filter(Boolean)) {
      acc += part + '/';
      crumbs.push(' / ', h('a', { href: kvHref(acc) }, part));
    }
    const list = h('ul', { id: 'kv-list', class: 'kv-list' });
    const editorBox = h('div', { class: 'kv-editor-box' });
    const newBtn = h('button', { id: 'kv-new', type: 'button', class: 'btn', onclick: () => editorBox.replaceChildren(kvEditor(ctx, folder, null, true)) }, 'New key');
    ctx.mount(h('section', { class: 'page' },
      h('div', { class: 'page-head' }, h('h1', null, 'Key/Value'), h('span', { class: 'crumbs' }, crumbs), newBtn),
      h('div', { class: 'kv-layout' }, list, editorBox)));

    once(ctx, async () => {
      const keys = (await api('GET', '/v1/kv/' + encKey(folder) + '?keys&separator=/', undefined, { allow404: true })) || [];
      if (!ctx.alive()) return;
      const items = keys.filter((k) => k !== folder).sort(byName).map((k) => {
        const dir = k.endsWith('/');
        return h('li', { 'data-key': k, class: [dir ? 'folder' : 'key', k === key && 'active'] },
          h('a', { href: kvHref(k) }, (dir ? '▸ ' : '') + k.slice(folder.length)));
      });
      if (!items.length) items.push(h('li', { class: 'muted empty' }, 'no keys'));
      list.replaceChildren(...items);
      if (key !== null) {
        const entry = await api('GET', '/v1/kv/' + encKey(key), undefined, { allow404: true });
        if (!ctx.alive()) return;
        // Only a KV answer (an array) is an entry.
        const found = Array.isArray(entry) && entry[0] ? entry[0] : null;
        editorBox.replaceChildren(kvEditor(ctx, folder, found || { Key: key, Value: null }, !found));
      }
    });
  }

  /** The editor of one key; isNew lets the key name be typed. */
  function kvEditor(ctx, folder, entry, isNew) {
    const keyInput = h('input', { id: 'kv-key', type: 'text', value: entry ? entry.Key : folder, readOnly: !isNew, autocomplete: 'off' });
    const decoded = entry ? decodeValue(entry.Value) : { text: '', size: 0 };
    const binary = decoded.text === null;
    const value = h('textarea', { id: 'kv-value', rows: 14, spellcheck: 'false', readOnly: binary,
      value: binary ? 'binary value, ' + decoded.size + ' bytes' : decoded.text });
    const error = h('p', { id: 'kv-error', class: 'form-error hidden' });
    const fail = (e) => { if (!e.loggedOut) { error.textContent = e.message; error.classList.remove('hidden'); } };
    const save = h('button', { id: 'kv-save', type: 'button', class: 'btn btn-primary', disabled: binary }, 'Save');
    const del = h('button', { id: 'kv-delete', type: 'button', class: 'btn btn-danger', disabled: isNew }, 'Delete');
    save.addEventListener('click', async () => {
      const k = keyInput.value.trim();
      if (!k) { fail({ message: 'a key is required' }); return; }
      try {
        await api('PUT', '/v1/kv/' + encKey(k), value.value);
        if (!ctx.alive()) return;
        if (location.hash === kvHref(k)) render(); else location.hash = kvHref(k);
      } catch (e) { fail(e); }
    });
    del.addEventListener('click', async () => {
      const k = keyInput.value;
      if (!confirm('Delete the key ' + k + '?')) return;
      try {
        await api('DELETE', '/v1/kv/' + encKey(k));
        if (!ctx.alive()) return;
        location.hash = kvHref(folder);
      } catch (e) { fail(e); }
    });
    return h('div', { id: 'kv-editor', class: 'card' },
      h('label', { for: 'kv-key' }, 'Key'), keyInput,
      h('label', { for: 'kv-value' }, 'Value'), value,
      binary ? h('p', { class: 'muted' }, 'binary values are read-only here') : null,
      error, h('div', { class: 'buttons' }, save, del));
  }

  // ───────────────────────────── start ─────────────────────────────

  async function start() {
    $('#logout').addEventListener('click', logout);
    $('#error').addEventListener('click', clearError);
    window.addEventListener('hashchange', render);
    if (!state.token) { renderLogin(''); return; }
    try {
      setWhoami(await api('GET', '/v1/acl/token/self'));
    } catch (e) {
      if (!e.loggedOut) showError(e.message);
      if (!state.token) return; // 403: the login page is shown
    }
    render();
  }

  start();
})();
