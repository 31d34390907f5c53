#!/usr/bin/env node
// Starts a flying-squid Minecraft server from a JSON settings file.
//
//   node squid-launcher.js SETTINGS.json
//
// The settings are merged over flying-squid's config/default-settings.json and handed to
// createMCServer. flying-squid's own app.js is not used: it overrides settings.json with
// its defaults and reads `--offline false` as true.
//
// Output:
//   `[zlh] ready on HOST:PORT` on stdout once the server's `ready` event fires
//   (after flying-squid's own `Server listening on port N, version V` line).
//   `[zlh] error: ...` on stderr for anything that stops the start.
// Console: flying-squid reads commands on stdin itself (its log plugin opens a readline
// on process.stdin when it is loaded), so `say hi` and `stop` work without wiring here.
// Exit codes: 0 after `stop`, 2 for a bad command line or settings file, 1 when the
// server cannot start (a port in use, say).
'use strict'

const fs = require('fs')
const path = require('path')

const EXIT_START_FAILED = 1
const EXIT_BAD_SETTINGS = 2
const READY_TIMEOUT_MS = 60000

function fail (code, message) {
  process.stderr.write(`[zlh] error: ${message}\n`)
  process.exit(code)
}

// The package lives in node_modules next to this file; NODE_PATH is honoured as well.
function locateSquid () {
  const paths = [__dirname]
  for (const dir of (process.env.NODE_PATH || '').split(path.delimiter)) {
    if (dir) paths.push(dir)
  }
  try {
    return path.dirname(require.resolve('flying-squid/package.json', { paths }))
  } catch (err) {
    return fail(EXIT_START_FAILED,
      `flying-squid is not installed (looked from ${paths.join(', ')}): ${err.message.split('\n')[0]}`)
  }
}

function readSettings (file, squidDir) {
  let text
  try {
    text = fs.readFileSync(file, 'utf8')
  } catch (err) {
    return fail(EXIT_BAD_SETTINGS, `cannot read settings file ${file}: ${err.message}`)
  }

  let own
  try {
    own = JSON.parse(text)
  } catch (err) {
    return fail(EXIT_BAD_SETTINGS, `settings file ${file} is not valid JSON: ${err.message}`)
  }
  if (own === null || typeof own !== 'object' || Array.isArray(own)) {
    return fail(EXIT_BAD_SETTINGS, `settings file ${file} must hold a JSON object`)
  }

  const defaults = JSON.parse(
    fs.readFileSync(path.join(squidDir, 'config', 'default-settings.json'), 'utf8'))
  const settings = Object.assign({}, defaults, own)

  // A relative world folder would depend on the working directory: anchor it to the file.
  settings.worldFolder = path.resolve(path.dirname(path.resolve(file)), settings.worldFolder)
  const port = settings.port
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    return fail(EXIT_BAD_SETTINGS, `settings file ${file}: port must be an integer 0-65535`)
  }
  return settings
}

function main (argv) {
  if (argv.length !== 1 || argv[0] === '-h' || argv[0] === '--help') {
    process.stderr.write('usage: node squid-launcher.js SETTINGS.json\n')
    process.exit(EXIT_BAD_SETTINGS)
  }

  const squidDir = locateSquid()
  const settings = readSettings(argv[0], squidDir)
  const host = settings.host || '0.0.0.0'
  const squid = require(squidDir)

  let server
  try {
    server = squid.createMCServer(settings)
  } catch (err) {
    return fail(EXIT_START_FAILED, `cannot create the server: ${err.message}`)
  }

  // flying-squid gives up on its own start after a few seconds with a rejected promise.
  process.on('unhandledRejection', (err) => {
    if (!server.isReady) fail(EXIT_START_FAILED, `start failed: ${err && err.message ? err.message : err}`)
    process.stderr.write(`[zlh] unhandled rejection: ${err && err.stack ? err.stack : err}\n`)
  })

  const readyTimer = setTimeout(() => {
    fail(EXIT_START_FAILED, `not ready on ${host}:${settings.port} after ${READY_TIMEOUT_MS} ms`)
  }, READY_TIMEOUT_MS)

  // Before `ready` an error means the socket never listened: report it and stop.
  // Afterwards flying-squid logs errors itself; they are echoed on stderr too.
  server.on('error', (err) => {
    if (!server.isReady) {
      const what = err && err.code ? `${err.code} (${err.message})` : String(err)
      fail(EXIT_START_FAILED, `cannot listen on ${host}:${settings.port}: ${what}`)
    }
    process.stderr.write(`[zlh] server error: ${err && err.stack ? err.stack : err}\n`)
  })

  server.on('ready', () => {
    clearTimeout(readyTimer)
    const port = server.listeningPort || settings.port
    process.stdout.write(`[zlh] ready on ${host}:${port}\n`)
  })
}

main(process.argv.slice(2))
