// `tdb dap` driven by Microsoft's own DAP test client (npm @vscode/debugadapter-testsupport), in the
// request order VS Code and nvim-dap really use. Run by tests/dap/test_dap_real_clients.py with node's
// built-in test runner; the environment says how to reach the adapter:
//   TDB_DAP_MODE      "stdio" (DebugClient spawns ide/vscode/bin/tdb-dap, the extension's launcher,
//                     with TDB_COMMAND) or "listen" (it connects to TDB_DAP_PORT on 127.0.0.1)
//   TDB_TEST_SERVER   host:port of the tdb server the launches name
//   TDB_TEST_LISTING  the file name of that model's site listing
//   TDB_DAP_TRANSCRIPT  if set, a folder: every message of each test is written there as JSON lines
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { DebugClient } = require('@vscode/debugadapter-testsupport');

const MODE = process.env.TDB_DAP_MODE || 'stdio';
const SERVER = process.env.TDB_TEST_SERVER;
const LISTING = process.env.TDB_TEST_LISTING;
const LAUNCHER = path.resolve(__dirname, '..', '..', 'ide', 'vscode', 'bin', 'tdb-dap');
const IDS = [5, 17, 42, 8, 99, 5, 17, 42, 3, 61];
const TIMEOUT = 60000;

// VS Code's and nvim-dap's own initialize arguments (as they send them)
const VSCODE_INIT = {
  clientID: 'vscode', clientName: 'Visual Studio Code', adapterID: 'tdb', pathFormat: 'path',
  linesStartAt1: true, columnsStartAt1: true, supportsVariableType: true, supportsVariablePaging: true,
  supportsRunInTerminalRequest: true, locale: 'en', supportsProgressReporting: true,
  supportsInvalidatedEvent: true, supportsMemoryReferences: true, supportsArgsCanBeInterpretedByShell: true,
  supportsMemoryEvent: true, supportsStartDebuggingRequest: true,
};
const NVIM_INIT = {
  clientID: 'neovim', clientName: 'neovim', adapterID: 'tdb', pathFormat: 'path', linesStartAt1: true,
  columnsStartAt1: true, supportsRunInTerminalRequest: true, supportsVariableType: true,
  supportsProgressReporting: true, supportsStartDebuggingRequest: true, locale: 'en_US.UTF-8',
};

/** A DebugClient that keeps every event, so a test waits for one whether or not it already came. */
async function open(name) {
  assert.ok(SERVER && LISTING, 'TDB_TEST_SERVER and TDB_TEST_LISTING must be set');
  const dc = new DebugClient('/bin/sh', LAUNCHER, 'tdb', { env: process.env });
  dc.defaultTimeout = TIMEOUT;
  const events = [];
  const waiters = [];
  const log = [];
  const emit = dc.emit.bind(dc);
  dc.emit = (kind, body) => {
    if (body && body.type === 'event') {
      events.push(body);
      log.push(body);
      for (const w of waiters.splice(0)) w();
    }
    return emit(kind, body);
  };
  const send = dc.send.bind(dc);
  dc.send = (command, args) => {
    log.push({ type: 'request', command, arguments: args });
    return send(command, args).then((r) => { log.push(r); return r; },
      (e) => { log.push({ type: 'response', command, success: false, message: e.message }); throw e; });
  };
  const used = new Set();
  dc.next = (kind) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no '${kind}' event; got ${events.map((e) => e.event)}`)), TIMEOUT);
    const look = () => {
      const i = events.findIndex((e, j) => e.event === kind && !used.has(j));
      if (i < 0) { waiters.push(look); return; }
      used.add(i);
      clearTimeout(timer);
      resolve(events[i]);
    };
    look();
  });
  dc.outputs = () => events.filter((e) => e.event === 'output').map((e) => e.body.output).join('');
  dc.finish = async () => {
    await dc.stop();
    if (process.env.TDB_DAP_TRANSCRIPT) {
      fs.writeFileSync(path.join(process.env.TDB_DAP_TRANSCRIPT, `${MODE}-${name}.jsonl`),
        log.map((m) => JSON.stringify(m)).join('\n') + '\n');
    }
  };
  await dc.start(MODE === 'listen' ? Number(process.env.TDB_DAP_PORT) : undefined);
  return dc;
}

async function siteLines(dc) {
  const text = (await dc.sourceRequest({ source: { sourceReference: 1 }, sourceReference: 1 })).body.content;
  const lines = {};
  text.split('\n').forEach((row, i) => { if (row) lines[row.split(/\s+/)[0]] = i + 1; });
  return lines;
}

async function topFrame(dc, threadId) {
  return (await dc.stackTraceRequest({ threadId, startFrame: 0, levels: 20 })).body.stackFrames[0];
}

test('VS Code: one setBreakpoints per file keeps the listing\'s breakpoints', { timeout: TIMEOUT }, async () => {
  const dc = await open('vscode');
  try {
    const caps = (await dc.initializeRequest(VSCODE_INIT)).body;
    assert.equal(caps.supportsConfigurationDoneRequest, true);
    await dc.launchRequest({ type: 'tdb', request: 'launch', name: 'tdb: tokens', server: SERVER, tokens: IDS,
      __sessionId: 'x' });
    await dc.next('initialized');
    const line = await siteLines(dc);
    // VS Code sends one request per file with breakpoints, then function and exception breakpoints
    const listing = { name: LISTING, path: LISTING, sourceReference: 1 };
    const mine = (await dc.setBreakpointsRequest({ source: listing, lines: [line['blocks.1.mlp.out']],
      breakpoints: [{ line: line['blocks.1.mlp.out'] }], sourceModified: false })).body.breakpoints;
    assert.equal(mine[0].verified, true);
    const other = (await dc.setBreakpointsRequest({ source: { name: 'train.py', path: '/ws/train.py' },
      lines: [3], breakpoints: [{ line: 3 }], sourceModified: false })).body.breakpoints;
    assert.equal(other[0].verified, false);
    assert.equal(other[0].source.path, '/ws/train.py');
    await dc.setFunctionBreakpointsRequest({ breakpoints: [] });
    await dc.setExceptionBreakpointsRequest({ filters: [] });
    await dc.configurationDoneRequest();

    const stop = await dc.next('stopped');
    assert.deepEqual(stop.body.hitBreakpointIds, [mine[0].id]);
    const threadId = stop.body.threadId;
    assert.deepEqual((await dc.threadsRequest()).body.threads.map((t) => t.id), [threadId]);
    const frame = await topFrame(dc, threadId);
    assert.equal(frame.name, 'blocks.1.mlp.out');
    assert.equal(frame.source.path, LISTING);
    assert.equal(frame.line, line['blocks.1.mlp.out']);
    const scopes = (await dc.scopesRequest({ frameId: frame.id })).body.scopes;
    const value = (await dc.variablesRequest({ variablesReference: scopes[0].variablesReference })).body.variables;
    assert.equal(value[0].name, 'blocks.1.mlp.out');
    // VS Code's hover extends the word under the mouse to the dotted path: blocks.1.mlp.out
    const hover = await dc.evaluateRequest({ expression: 'blocks.1.mlp.out', frameId: frame.id, context: 'hover' });
    assert.equal(hover.body.result, value[0].value);
    await dc.continueRequest({ threadId });
    assert.equal((await dc.next('exited')).body.exitCode, 0);
    await dc.next('terminated');
    assert.match(dc.outputs(), /next token: /);
  } finally {
    await dc.finish();
  }
});

test('Neovim: the listing named by its path, no sourceReference', { timeout: TIMEOUT }, async () => {
  const dc = await open('neovim');
  try {
    await dc.initializeRequest(NVIM_INIT);
    await dc.launchRequest({ type: 'tdb', request: 'launch', name: 'tdb: tokens', server: SERVER, tokens: IDS,
      breakpoints: ['blocks.0.attn.out'] });
    await dc.next('initialized');
    await dc.setExceptionBreakpointsRequest({ filters: [] });
    await dc.configurationDoneRequest();
    const stop = await dc.next('stopped');
    const threadId = stop.body.threadId;
    const frame = await topFrame(dc, threadId);
    assert.equal(frame.source.path, LISTING);               // nvim-dap names the buffer (and its filetype) so
    const text = (await dc.sourceRequest({ source: frame.source, sourceReference: frame.source.sourceReference }))
      .body.content;
    const rows = text.split('\n');
    const line = rows.findIndex((r) => r.startsWith('blocks.1.attn.out ')) + 1;
    // dap.toggle_breakpoint() in that buffer: the path made absolute, no sourceReference
    const bps = (await dc.setBreakpointsRequest({ source: { name: LISTING, path: `/home/me/${LISTING}` },
      breakpoints: [{ line }], lines: [line] })).body.breakpoints;
    assert.equal(bps[0].verified, true, bps[0].message);
    const foreign = (await dc.setBreakpointsRequest({ source: { path: '/home/me/austen.tdbsites' },
      breakpoints: [{ line }] })).body.breakpoints;
    assert.equal(foreign[0].verified, false);
    assert.match(foreign[0].message, /another model/);
    await dc.continueRequest({ threadId });
    const again = await dc.next('stopped');
    assert.deepEqual(again.body.hitBreakpointIds, [bps[0].id]);
    // widgets.hover("<cWORD>") on that line sends the whole site name; <cexpr> sends "blocks"
    const hovered = await dc.evaluateRequest({ expression: 'blocks.1.attn.out', context: 'hover' });
    assert.match(hovered.body.result, /^\[1, 10, 32\] mean=/);
    const module = await dc.evaluateRequest({ expression: 'blocks', context: 'hover' });
    assert.match(module.body.result, /sites \(blocks\.0\.resid_pre/);
    await dc.terminateRequest({});
    assert.equal((await dc.next('exited')).body.exitCode, 2);
  } finally {
    await dc.finish();
  }
});

test('generation: token boundaries are steps, the text so far is shown', { timeout: TIMEOUT }, async () => {
  const dc = await open('generate');
  try {
    await dc.initializeRequest(VSCODE_INIT);
    await dc.launchRequest({ type: 'tdb', request: 'launch', name: 'tdb: generate', server: SERVER, tokens: IDS,
      generate: { maxNewTokens: 3, stopAtTokens: true } });
    await dc.next('initialized');
    await dc.configurationDoneRequest();
    let stop = await dc.next('stopped');
    assert.match(stop.body.description, /token 0/);
    const threadId = stop.body.threadId;
    const frame = await topFrame(dc, threadId);
    assert.equal(frame.name, 'model');
    const scopes = (await dc.scopesRequest({ frameId: frame.id })).body.scopes;
    const gen = scopes.find((s) => s.name === 'Generated');
    const vars = (await dc.variablesRequest({ variablesReference: gen.variablesReference })).body.variables;
    assert.equal(vars[0].name, 'text');
    assert.match(dc.outputs(), /tdb: token 0: /);
    await dc.nextRequest({ threadId });                      // Step Over at a boundary: the next token
    stop = await dc.next('stopped');
    assert.match(stop.body.description, /token 1/);
    await dc.continueRequest({ threadId });
    assert.equal((await dc.next('exited')).body.exitCode, 0);
    assert.match(dc.outputs(), /generated: '/);
  } finally {
    await dc.finish();
  }
});
