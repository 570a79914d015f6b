// Preloaded (`node -r`) into the Kinesis emulator by the test harness. The emulator has no
// host setting and listens on every interface; this rewrites each listen() to loopback so a
// test never exposes a port beyond 127.0.0.1.
'use strict';
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if (first !== null && typeof first === 'object' && !Array.isArray(first)) {
    args[0] = Object.assign({}, first, { host: '127.0.0.1' });
  } else if (typeof first === 'number' || (typeof first === 'string' && /^\d+$/.test(first))) {
    if (typeof args[1] === 'string') {
      args[1] = '127.0.0.1';
    } else {
      args.splice(1, 0, '127.0.0.1');
    }
  }
  return listen.apply(this, args);
};

// Exit with the test process that started us: a static in a test binary is never dropped, so
// the harness cannot stop the emulator itself, nor remove the folder it made for the
// emulator's log (EDGESHIP_OWN_DIR), which the emulator then removes on its way out.
const parent = Number(process.env.EDGESHIP_PARENT_PID || 0);
const ownDir = process.env.EDGESHIP_OWN_DIR || '';
if (parent > 0) {
  setInterval(() => {
    try {
      process.kill(parent, 0);
    } catch (e) {
      if (ownDir !== '') {
        require('fs').rmSync(ownDir, { recursive: true, force: true });
      }
      process.exit(0);
    }
  }, 500).unref();
}
