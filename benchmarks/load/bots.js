// N offline-mode mineflayer bots join one Minecraft server, each says one line, they stay
// HOLD_MS, then leave. Prints one JSON object: each bot's join time (ms from its TCP
// connection to its spawn in the world, and from its start) or its failure, and the wall
// time from the first start to the last spawn. The protocol data is loaded once before the
// first bot, so the times are the server's, not this script's. Bots start STAGGER_MS
// apart; the whole run is capped.
// usage: node bots.js HOST PORT COUNT [STAGGER_MS] [HOLD_MS] [FIRST]   (NODE_PATH: mineflayer)
// FIRST numbers the bots' names (zlhbotFIRST, ...), so several runners can share a server.
const mineflayer = require('mineflayer');
require('minecraft-data')('1.21.4');

const [host, port, count, stagger = '100', hold = '5000', first = '0'] = process.argv.slice(2);
const total = Number(count);
const results = new Array(total).fill(null);
const bots = [];
const cap = setTimeout(() => finish('time cap reached'), 120000);
let joined = 0;
let settled = 0;
let firstStart = null;
let lastSpawn = null;

function settle() {
  settled += 1;
  if (settled === total) {
    setTimeout(() => finish(null), Number(hold));
  }
}

function start(index) {
  const username = `zlhbot${Number(first) + index}`;
  const began = Date.now();
  firstStart = firstStart ?? began;
  let connected = null;
  const bot = mineflayer.createBot({ host, port: Number(port), username, auth: 'offline', version: '1.21.4' });
  bots.push(bot);
  bot._client.once('connect', () => { connected = Date.now(); });
  bot.once('spawn', () => {
    lastSpawn = Date.now();
    results[index] = { username, join_ms: lastSpawn - (connected ?? began), from_start_ms: lastSpawn - began };
    joined += 1;
    bot.chat(`hello from ${username}`);
    settle();
  });
  const fail = (why) => {
    if (results[index] === null) {
      results[index] = { username, error: String(why) };
      settle();
    }
  };
  bot.once('error', fail);
  bot.once('kicked', (reason) => fail(`kicked: ${reason}`));
  bot.once('end', (reason) => fail(`ended: ${reason}`));
}

function finish(note) {
  clearTimeout(cap);
  for (const bot of bots) {
    try { bot.quit(); } catch (e) { /* already gone */ }
  }
  const wall = lastSpawn === null ? null : lastSpawn - firstStart;
  process.stdout.write(JSON.stringify({ joined, results, note, wall_ms: wall }) + '\n');
  setTimeout(() => process.exit(0), 500);
}

for (let i = 0; i < total; i += 1) {
  setTimeout(() => start(i), i * Number(stagger));
}
