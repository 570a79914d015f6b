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
// the harness cannot stop the emulator itself.
const parent = Number(process.env.EDGESHIP_PARENT_PID || 0);
if (parent > 0) {
  setInterval(() => {
    try {
      process.kill(parent, 0);
    } catch (e) {
      process.exit(0);
    }
  }, 500).unref();
}
