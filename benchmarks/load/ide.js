// IDE session load on one code-server: each iteration logs in with the password, loads the
// workbench page and its three main assets, and opens the workbench's websocket (101,
// held for a second, closed). Run by benchmarks/load_test.py; bounded by VUS x ITERATIONS
// and a maximum duration.
import http from 'k6/http';
import ws from 'k6/ws';
import { check } from 'k6';
import { Trend } from 'k6/metrics';

const BASE = __ENV.BASE_URL;
const FOLDER = __ENV.FOLDER;
const PASSWORD = __ENV.IDE_PASSWORD;
const pageLoad = new Trend('page_load', true);

export const options = {
  scenarios: {
    ide: {
      executor: 'per-vu-iterations',
      vus: Number(__ENV.VUS || 10),
      iterations: Number(__ENV.ITERATIONS || 3),
      maxDuration: __ENV.MAX_DURATION || '180s',
    },
  },
  // Thresholds make k6 report the tagged steps on their own; 99 % of checks must pass.
  thresholds: {
    'http_req_duration{name:login}': ['p(95)<60000'],
    'http_req_duration{name:workbench}': ['p(95)<60000'],
    checks: ['rate>0.99'],
  },
  summaryTrendStats: ['min', 'med', 'p(95)', 'max'],
};

function uuid() {
  return 'xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx'.replace(/[xy]/g, (c) => {
    const r = (Math.random() * 16) | 0;
    return (c === 'x' ? r : (r & 0x3) | 0x8).toString(16);
  });
}

export default function () {
  const login = http.post(`${BASE}/login`, { password: PASSWORD },
    { redirects: 0, tags: { name: 'login' } });
  const cookies = login.cookies['code-server-session'] || [];
  check(login, { 'login answers 302 with a session cookie': (r) => r.status === 302 && cookies.length === 1 });
  if (cookies.length !== 1) {
    return;
  }
  const session = cookies[0].value;

  const started = Date.now();
  const page = http.get(`${BASE}/?folder=${encodeURIComponent(FOLDER)}`, { tags: { name: 'workbench' } });
  const ok = check(page, { 'workbench page 200': (r) => r.status === 200 && r.body.includes('workbench') });
  if (ok) {
    const assets = [...page.body.matchAll(/(?:src|href)="(stable-[^"]+\.(?:js|css))"/g)].map((m) => m[1]);
    const answers = http.batch(assets.map((path) => ['GET', `${BASE}/${path}`, null, { tags: { name: 'asset' } }]));
    check(answers, { 'assets 200': (rs) => rs.length >= 3 && rs.every((r) => r.status === 200) });
  }
  pageLoad.add(Date.now() - started);

  const url = `${BASE.replace('http', 'ws')}/?reconnectionToken=${uuid()}&reconnection=false&skipWebSocketFrames=false`;
  const res = ws.connect(url, { headers: { Cookie: `code-server-session=${session}` }, tags: { name: 'websocket' } },
    (socket) => { socket.on('open', () => socket.setTimeout(() => socket.close(), 1000)); });
  check(res, { 'websocket upgraded (101)': (r) => r && r.status === 101 });
}
