// The web console: a page over the REST API of this gateway, nothing else.
// Sign in with a namespace and key (POST /auth); the token stays in this tab's
// sessionStorage. The instance list and an instance's events follow the event
// watch (GET /events:watch, NDJSON). The serial console and the screen are the
// console:attach and vdi:connect WebSockets, whose first frame carries the token.

import { Terminal } from '/ui/vendor/xterm/lib/xterm.mjs';
import RFB from '/ui/vendor/novnc/core/rfb.js';

const main = document.getElementById('main');
const errorBox = document.getElementById('error');
let session = JSON.parse(sessionStorage.getItem('sf-session') || 'null');
let leave = [];     // what the current page must stop when another is shown

// ------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = {};
  if (session) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const type = r.headers.get('Content-Type') || '';
  const data = type.startsWith('application/json') ? await r.json() : await r.blob();
  if (!r.ok) {
    if (r.status === 401 && session) signOut();
    throw new ApiError(r.status, data && data.error ? data.error : `${method} ${path}: ${r.status}`);
  }
  return data;
}

function showError(e) {
  errorBox.textContent = e ? String(e.message || e) : '';
  errorBox.hidden = !e;
}

// Calls onEvent(event) for each event of the namespace from now on, until stopped.
// The watch resumes from its last cursor when the connection drops.
function watchEvents(query, onEvent) {
  const controller = new AbortController();
  let cursor = '';
  (async () => {
    while (!controller.signal.aborted) {
      try {
        const q = new URLSearchParams(query);
        if (cursor) q.set('cursor', cursor);
        const r = await fetch(`/events:watch?${q}`, {
          headers: { Authorization: `Bearer ${session.token}` }, signal: controller.signal });
        if (!r.ok) throw new ApiError(r.status, (await r.json()).error);
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffered = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffered += value;
          let nl;
          while ((nl = buffered.indexOf('\n')) >= 0) {
            const line = JSON.parse(buffered.slice(0, nl));
            buffered = buffered.slice(nl + 1);
            if (line.error) throw new ApiError(line.status, line.error);
            cursor = line.cursor || cursor;
            onEvent(line.event || null);
          }
        }
      } catch (e) {
        if (controller.signal.aborted) return;
        if (e.status === 400) cursor = '';   // the cursor expired: start again from now
        await new Promise((resolve) => setTimeout(resolve, 1000));   // then reconnect
      }
    }
  })();
  return () => controller.abort();
}

// A WebSocket to one of the two-way routes, signed in by its first frame.
function socket(path) {
  const ws = new WebSocket(`${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${path}`);
  ws.binaryType = 'arraybuffer';
  ws.addEventListener('open', () => ws.send(JSON.stringify({ authorization: `Bearer ${session.token}` })));
  return ws;
}

// ------------------------------------------------------------------ pages

function page(templateId) {
  for (const stop of leave) stop();
  leave = [];
  showError(null);
  main.replaceChildren(document.getElementById(templateId).content.cloneNode(true));
}

function signOut() {
  session = null;
  sessionStorage.removeItem('sf-session');
  location.hash = '#/sign-in';
  route();
}

function signInPage() {
  page('sign-in-page');
  document.getElementById('sign-in').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const form = new FormData(ev.target);
    try {
      session = null;
      const r = await api('POST', '/auth', { namespace: form.get('namespace'), key: form.get('key') });
      session = { token: r.access_token, namespace: form.get('namespace') };
      sessionStorage.setItem('sf-session', JSON.stringify(session));
      location.hash = '#/instances';
    } catch (e) { showError(e); }
  });
}

function cell(text) {
  const td = document.createElement('td');
  td.textContent = text === null || text === undefined ? '' : String(text);
  return td;
}

async function listPage() {
  page('list-page');
  const body = document.querySelector('#instances tbody');
  let latest = 0;     // refreshes may answer out of order: only the newest is shown
  async function refresh() {
    const mine = ++latest;
    try {
      const instances = await api('GET', '/instances');
      if (mine !== latest) return;
      body.replaceChildren(...instances.map((i) => {
        const tr = document.createElement('tr');
        tr.dataset.uuid = i.uuid;
        tr.dataset.name = i.name;
        tr.append(cell(i.name), cell(i.state), cell(i.power_state), cell(i.node), cell(i.cpus),
                  cell(`${i.memory} MiB`), cell(i.uuid));
        tr.addEventListener('click', () => { location.hash = `#/instances/${i.uuid}`; });
        return tr;
      }));
    } catch (e) { showError(e); }
  }
  let pending = null;
  leave.push(watchEvents({ object_type: 'instance' }, (event) => {
    document.getElementById('live').textContent = 'live';
    if (event === null) return refresh();      // the watch is established: a fresh start
    clearTimeout(pending);
    pending = setTimeout(refresh, 100);        // a burst of events is one refresh
  }));
}

async function instancePage(uuid) {
  page('instance-page');
  const details = document.getElementById('details');
  let latest = 0;     // refreshes may answer out of order: only the newest is shown
  async function refresh() {
    const mine = ++latest;
    const i = await api('GET', `/instances/${uuid}`);
    if (mine !== latest) return i;
    document.getElementById('instance-name').textContent = i.name;
    const shown = { uuid: i.uuid, state: i.state, power_state: i.power_state, agent_state: i.agent_state,
                    node: i.node, cpus: i.cpus, memory: `${i.memory} MiB`,
                    addresses: (i.interfaces || []).map((n) => n.ipv4).filter(Boolean).join(', '),
                    video: i.video ? `${i.video.model}, ${i.video.vdi}` : '' };
    details.replaceChildren(...Object.entries(shown).flatMap(([k, v]) => {
      const dt = document.createElement('dt');
      dt.textContent = k;
      const dd = document.createElement('dd');
      dd.textContent = v === null || v === undefined ? '' : String(v);
      dd.id = `detail-${k}`;
      return [dt, dd];
    }));
    return i;
  }
  let instance;
  try { instance = await refresh(); } catch (e) { showError(e); return; }

  for (const button of document.querySelectorAll('[data-action]')) {
    button.addEventListener('click', async () => {
      try { await api('POST', `/instances/${uuid}/${button.dataset.action}`); } catch (e) { showError(e); }
    });
  }
  document.getElementById('delete-button').addEventListener('click', async () => {
    if (!confirm(`Delete ${instance.name}?`)) return;
    try { await api('DELETE', `/instances/${uuid}`); location.hash = '#/instances'; } catch (e) { showError(e); }
  });
  document.getElementById('screenshot-button').addEventListener('click', async () => {
    try {
      const blob = await api('GET', `/instances/${uuid}/screenshot`);
      const png = await api('GET', `/blobs/${blob}/data`);
      const img = document.getElementById('screenshot');
      img.src = URL.createObjectURL(png);
      img.hidden = false;
    } catch (e) { showError(e); }
  });

  // Events: the latest, then live.
  const events = document.querySelector('#events tbody');
  function addEvent(e, atTop) {
    const tr = document.createElement('tr');
    tr.append(cell(new Date(e.timestamp * 1000).toLocaleTimeString()), cell(e.type), cell(e.fqdn), cell(e.message));
    if (atTop) events.prepend(tr); else events.append(tr);
  }
  try { for (const e of await api('GET', `/instances/${uuid}/events?limit=50`)) addEvent(e, false); } catch (e) { showError(e); }
  leave.push(watchEvents({ object_type: 'instance', object_ref: uuid }, (e) => {
    if (e === null) return;
    addEvent(e, true);
    refresh().catch(showError);
  }));

  // The serial console, interactive.
  const term = new Terminal({ cols: 100, rows: 24, convertEol: false, scrollback: 2000 });
  term.open(document.getElementById('terminal'));
  const serial = socket(`/instances/${uuid}/console:attach`);
  serial.addEventListener('message', (m) => {
    if (typeof m.data === 'string') showError(JSON.parse(m.data).error);   // an error frame
    else term.write(new Uint8Array(m.data));
  });
  serial.addEventListener('close', () => term.write('\r\n[console closed]\r\n'));
  const typing = term.onData((data) => { if (serial.readyState === WebSocket.OPEN) serial.send(data); });
  window.sfTerminal = term;       // for the browser test: the terminal's text
  leave.push(() => { typing.dispose(); serial.close(); term.dispose(); });

  // The screen, when the instance has a VNC console.
  const status = document.getElementById('vnc-status');
  if (instance.video && instance.video.vdi === 'vnc') {
    let password = '';
    try {
      const helper = await (await api('GET', `/instances/${uuid}/vdiconsolehelper`)).text();
      password = (helper.match(/^password=(.*)$/m) || [])[1] || '';
    } catch (e) { status.textContent = `(no console yet: ${e.message})`; }
    const ws = socket(`/instances/${uuid}/vdi:connect`);
    const rfb = new RFB(document.getElementById('vnc'), ws, { credentials: { password } });
    rfb.scaleViewport = false;
    rfb.addEventListener('connect', () => { status.textContent = '(connected)'; });
    rfb.addEventListener('disconnect', () => { status.textContent = '(disconnected)'; });
    rfb.addEventListener('credentialsrequired', () => rfb.sendCredentials({ password }));
    leave.push(() => rfb.disconnect());
  } else {
    status.textContent = '(this instance has no VNC console)';
  }
}

async function createPage() {
  page('create-page');
  const form = document.getElementById('create');
  try {
    for (const n of await api('GET', '/networks')) {
      const option = document.createElement('option');
      option.value = n.uuid;
      option.textContent = `${n.name} (${n.netblock})`;
      form.network.append(option);
    }
  } catch (e) { showError(e); }
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const f = new FormData(form);
    const disk = { size: Number(f.get('disk_size')), type: 'disk' };
    if (f.get('disk_base')) disk.base = f.get('disk_base');
    const body = {
      name: f.get('name'), cpus: Number(f.get('cpus')), memory: Number(f.get('memory')), disk: [disk],
      network: f.get('network') ? [{ network_uuid: f.get('network') }] : [],
      video: { model: f.get('video_model'), memory: 16384, vdi: f.get('video_vdi') },
    };
    try {
      const created = await api('POST', '/instances', body);
      location.hash = `#/instances/${created.uuid}`;
    } catch (e) { showError(e); }
  });
}

// ------------------------------------------------------------------ routing

function route() {
  const nav = document.getElementById('nav');
  nav.hidden = !session;
  if (!session) return signInPage();
  document.getElementById('whoami').textContent = `namespace ${session.namespace}`;
  const hash = location.hash || '#/instances';
  const m = hash.match(/^#\/instances\/([0-9a-f-]{36})$/);
  if (m) return instancePage(m[1]);
  if (hash === '#/create') return createPage();
  return listPage();
}

document.getElementById('sign-out').addEventListener('click', signOut);
window.addEventListener('hashchange', route);
route();
