// arbstr's preload for Node clients in regular (HTTPS_PROXY) mode:
//   node --require "$(arbstr node-preload)" app.js
// Node's fetch, which the openai Node SDK uses, ignores HTTPS_PROXY: it would connect straight to
// api.openai.com. undici (the library behind Node's fetch) has EnvHttpProxyAgent, which reads
// HTTPS_PROXY, HTTP_PROXY and NO_PROXY (credentials in the URL included); set as the global
// dispatcher, Node's own fetch uses it too. undici is taken from the application's own
// node_modules (npm install undici@7 for Node 20 and 22), so its version is the application's.
"use strict";

function loadUndici() {
  for (const base of [process.cwd(), __dirname]) {
    try {
      return require(require.resolve("undici", { paths: [base] }));
    } catch (error) {
      if (error.code !== "MODULE_NOT_FOUND") throw error;
    }
  }
  return null;
}

if (process.env.HTTPS_PROXY || process.env.https_proxy || process.env.HTTP_PROXY || process.env.http_proxy) {
  const undici = loadUndici();
  if (undici && typeof undici.EnvHttpProxyAgent === "function") {
    undici.setGlobalDispatcher(new undici.EnvHttpProxyAgent());
  } else {
    process.emitWarning(
      "arbstr preload: undici (>= 6.13) is not installed here, so HTTPS_PROXY is ignored by fetch. " +
      "Run `npm install undici@7`, or on a Node that supports it set NODE_USE_ENV_PROXY=1.",
      "ArbstrProxyWarning");
  }
}
