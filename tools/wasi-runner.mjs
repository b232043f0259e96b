#!/usr/bin/env node
// Runs a wasm32-wasip1 program (e.g. a `cargo test --target wasm32-wasip1` test binary)
// under Node's built-in WASI (preview1). Used as CARGO_TARGET_WASM32_WASIP1_RUNNER.
//
//   node tools/wasi-runner.mjs path/to/prog.wasm [args...]
//
// argv is passed through (argv[0] is the wasm path, like a native binary), the environment is
// passed through, the current directory is preopened as "." (and "/" as "/"), and the process
// exits with the program's exit code.

// node:wasi prints an ExperimentalWarning on first use; drop only that warning.
const originalEmitWarning = process.emitWarning;
process.emitWarning = function (warning, ...rest) {
  const type = typeof rest[0] === 'string' ? rest[0] : rest[0] && rest[0].type;
  const name = warning && warning.name;
  if (type === 'ExperimentalWarning' || name === 'ExperimentalWarning') {
    if (String(warning && warning.message ? warning.message : warning).includes('WASI')) {
      return;
    }
  }
  return originalEmitWarning.call(process, warning, ...rest);
};

const { readFile } = await import('node:fs/promises');
const { WASI } = await import('node:wasi');

const [wasmPath, ...args] = process.argv.slice(2);
if (!wasmPath) {
  process.stderr.write('usage: node tools/wasi-runner.mjs FILE.wasm [ARGS...]\n');
  process.exit(2);
}

const wasi = new WASI({
  version: 'preview1',
  args: [wasmPath, ...args],
  env: process.env,
  preopens: { '.': process.cwd(), '/': '/' },
  returnOnExit: true,
});

let code;
try {
  const module = await WebAssembly.compile(await readFile(wasmPath));
  const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
  code = wasi.start(instance);
} catch (err) {
  // A trap (e.g. a panic with panic=abort -> `unreachable`) ends up here.
  // With panic=abort (the wasm32-wasip1 default) a failing test aborts the whole test binary;
  // the panic message has already been printed by the program itself.
  const msg = err && err.message ? err.message : String(err);
  process.stderr.write(`wasi-runner: ${wasmPath}: trapped: ${msg}\n`);
  if (process.env.WASI_RUNNER_STACK) process.stderr.write(`${err && err.stack}\n`);
  code = 101;
}
process.exitCode = typeof code === 'number' ? code : 0;
