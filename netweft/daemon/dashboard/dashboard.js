// The netweft dashboard: renders /api/stream's overviews (server-sent events). Data is only ever put
// into the page as text (textContent), never as HTML.
"use strict";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function td(child, cls) { const t = el("td", undefined, cls); t.appendChild(child); return t; }

function fill(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows);
}

function ms(v) { return v === null || v === undefined ? "" : `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ms`; }

function render(o) {
  document.getElementById("rev").textContent = o.rev;
  document.getElementById("served-by").textContent = o.served_by || "";
  document.getElementById("cluster").textContent = o.cluster ? `cluster ${o.cluster.slice(0, 12)}` : "";
  document.getElementById("updated").textContent = new Date().toLocaleTimeString();
  document.getElementById("problem").hidden = true;

  document.getElementById("nodes-count").textContent = `(${o.nodes.length})`;
  fill("nodes", o.nodes.map(n => {
    const tr = row([el("td", n.hostname, "host"), n.role + (n.leader ? " (leader)" : ""),
                    td(el("span", n.state, `badge ${n.state}`)), el("td", n.addr, "mono"), n.availability,
                    (n.cert_not_after || "").slice(0, 10), el("td", n.id.slice(0, 12), "mono")]);
    tr.dataset.node = n.hostname;
    return tr;
  }));

  const names = Object.fromEntries(o.nodes.map(n => [n.id, n.hostname]));
  const head = document.querySelector("#health thead");
  const hr = document.createElement("tr");
  hr.appendChild(el("th", "from \\ to"));
  for (const n of o.nodes) hr.appendChild(el("th", n.hostname));
  head.replaceChildren(hr);
  fill("health", o.nodes.map(from => {
    const tr = document.createElement("tr");
    tr.appendChild(el("th", from.hostname, "from"));
    for (const to of o.nodes) {
      let cell;
      if (from.id === to.id) {
        cell = el("span", "·", "cell self");
      } else {
        const h = (o.health[from.id] || {})[to.id];
        const state = h ? h.state : "unknown";
        const text = h && state !== "unknown" ? `${state} ${Math.round(h.loss * 100)}% ${ms(h.rtt_ms)}`.trim() : "not probed";
        cell = el("span", text, `cell ${state}`);
        cell.title = h ? [h.reason, h.mtu_ok === false ? "full-MTU probes fail" : "", h.since ? `since ${h.since}` : ""]
          .filter(Boolean).join(" · ") : `${from.hostname} has not probed ${names[to.id]}`;
      }
      const c = td(cell);
      c.dataset.from = from.hostname; c.dataset.to = to.hostname;
      tr.appendChild(c);
    }
    return tr;
  }));

  document.getElementById("networks-count").textContent = `(${o.networks.length})`;
  fill("networks", o.networks.map(n => {
    const flags = [n.attachable ? "attachable" : "", n.internal ? "internal" : ""].filter(Boolean).join(", ");
    const tr = row([el("td", n.name, "net"), el("td", n.subnet, "mono"), el("td", n.gateway, "mono"), n.vni,
                    n.endpoints, flags, el("td", n.id.slice(0, 12), "mono")]);
    tr.dataset.network = n.name;
    return tr;
  }));

  const more = o.endpoints_total > o.endpoints.length ? ` of ${o.endpoints_total}` : "";
  document.getElementById("endpoints-count").textContent = `(${o.endpoints.length}${more})`;
  fill("endpoints", o.endpoints.map(e => {
    const tr = row([e.name, e.network, e.host, el("td", e.ip, "mono"), el("td", e.mac, "mono"), e.kind]);
    tr.dataset.endpoint = e.name;
    return tr;
  }));
}

function status(text, cls) {
  const s = document.getElementById("status");
  s.textContent = text; s.className = `badge ${cls}`;
}

function problem(text) {
  const p = document.getElementById("problem");
  p.textContent = text; p.hidden = false;
}

function connect() {
  const src = new EventSource("/api/stream");
  src.addEventListener("open", () => status("live", "live"));
  src.addEventListener("overview", ev => { status("live", "live"); render(JSON.parse(ev.data)); });
  src.addEventListener("problem", ev => problem(JSON.parse(ev.data).error));
  src.addEventListener("error", () => status("reconnecting", "offline"));  // EventSource retries by itself
}

connect();
