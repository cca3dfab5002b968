// llama.cpp itself, through node-llama-cpp's prebuilt CPU binaries; driven by llama_cpp_node.py.
// Usage: node llama_cpp_node.mjs <node-llama-cpp entry file>
// Answers one JSON request per stdin line with one JSON line on stdout, {"result": ...} or {"error": message}.
// A request names its model: {"model": {"path", "vocab_only", "threads", "context", "stamp"}, "op": ...}; the file
// is loaded on first use and kept until a request names another one (or other options).
//   {"op": "tokenize", "texts": [str], "special": bool}     -> [[id, ...], ...]   (never adds bos)
//   {"op": "greedy", "prompt": [id], "steps": n}           -> [id, ...]          (argmax, no penalties, no stop)
//   {"op": "probs", "tokens": [id]}                         -> [[ids, probabilities] after each prefix]
// Every evaluation starts from an empty KV cache, stored in F32 so that no f16 rounding enters the logits.
import {createInterface} from "node:readline";
import {pathToFileURL} from "node:url";

const {getLlama, LlamaLogLevel} = await import(pathToFileURL(process.argv[2]).href);
const llama = await getLlama({gpu: false, build: "never", skipDownload: true, progressLogs: false,
                              logLevel: LlamaLogLevel.error});

let loaded = {key: null, model: null, sequence: null};

async function load(options) {
    const key = JSON.stringify(options);
    if (loaded.key === key)
        return loaded;
    await loaded.model?.dispose();
    loaded = {key: null, model: null, sequence: null};
    const threads = options.threads ?? 1;
    const model = await llama.loadModel({modelPath: options.path, vocabOnly: !!options.vocab_only, gpuLayers: 0});
    const sequence = options.vocab_only ? null : (await model.createContext({
        contextSize: options.context ?? 512, threads, flashAttention: false,
        experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32"})).getSequence();
    loaded = {key, model, sequence};
    return loaded;
}

const greedy = {temperature: 0};

// Feeds `tokens` to an empty sequence; `want(i)` says after which positions the next token is computed.
async function evaluate(sequence, tokens, want) {
    await sequence.clearHistory();
    return sequence.controlledEvaluate(tokens.map((token, i) => want(i)
        ? [token, {generateNext: {token: true, probabilities: true, options: greedy}}]
        : token));
}

async function run(task) {
    const {model, sequence} = await load(task.model);
    if (task.op === "tokenize")
        return task.texts.map((text) => Array.from(model.tokenize(text, task.special)));
    if (sequence === null)
        throw new Error(`${task.op} needs the weights; the model was loaded with vocab_only`);
    if (task.op === "probs") {
        const out = await evaluate(sequence, task.tokens, () => true);
        return out.map((o) => [Array.from(o.next.probabilities.keys()), Array.from(o.next.probabilities.values())]);
    }
    if (task.op === "greedy") {
        const tokens = [];
        let out = await evaluate(sequence, task.prompt, (i) => i === task.prompt.length - 1);
        for (;;) {
            tokens.push(out[out.length - 1].next.token);
            if (tokens.length >= task.steps)
                return tokens;
            out = await sequence.controlledEvaluate([[tokens.at(-1), {generateNext: {token: true, options: greedy}}]]);
        }
    }
    throw new Error(`unknown op ${JSON.stringify(task.op)}`);
}

process.stdout.write(JSON.stringify({ready: true, release: llama.llamaCppRelease}) + "\n");
for await (const line of createInterface({input: process.stdin})) {
    let reply;
    try {
        reply = {result: await run(JSON.parse(line))};
    } catch (e) {
        reply = {error: String(e?.stack ?? e)};
    }
    process.stdout.write(JSON.stringify(reply) + "\n");
}
await llama.dispose();
