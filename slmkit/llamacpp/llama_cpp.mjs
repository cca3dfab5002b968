// llama.cpp itself, through node-llama-cpp's prebuilt CPU binaries; driven by slmkit/llamacpp/runner.py.
// Usage: node llama_cpp.mjs <node-llama-cpp entry file>
// Answers one JSON request per stdin line with one JSON line on stdout, {"result": ...} or {"error": message}.
// A request names its model and context:
//   {"model": {"path", "vocab_only", "stamp"},
//    "context": {"threads", "size", "sequences", "kv_type": "F32"|"F16", "flash_attention": bool|"auto"},
//    "op": ...}
// The model file is loaded on first use and kept until a request names another one; contexts are kept per options.
//   {"op": "tokenize", "texts": [str], "special": bool}   -> [[id, ...], ...]   (never adds bos)
//   {"op": "greedy", "prompt": [id], "steps": n}         -> [id, ...]          (argmax, no penalties, no stop)
//   {"op": "probs", "tokens": [id]}                       -> [[ids, probabilities] after each prefix]
//   {"op": "score", "tokens": [id]}                       -> {log_probs, argmax, second, full}: for i < n - 1,
//        log p(tokens[i+1] | tokens[..i]) and llama.cpp's argmax after tokens[..i] (see `score` below)
//   {"op": "timed_decode", "prompts": [[id]], "steps": n} -> {tokens: [[id]], times_ms: [[ms]]}: one sequence per
//        prompt, decoded together (llama.cpp batches the sequences of a context into one decode); times_ms[s][j] is
//        when stream s had its j-th token, measured here from the start of the prompts' evaluation.
// Every evaluation starts from an empty KV cache.
import {createInterface} from "node:readline";
import {pathToFileURL} from "node:url";

const {getLlama, LlamaLogLevel, TokenBias} = await import(pathToFileURL(process.argv[2]).href);
// maxThreads 0: a context's `threads` is the exact thread count, not a hint shared with other contexts.
const llama = await getLlama({gpu: false, build: "never", skipDownload: true, progressLogs: false,
                              logLevel: LlamaLogLevel.error, maxThreads: 0});

let loaded = {key: null, model: null, contexts: new Map()};

async function loadModel(options) {
    const key = JSON.stringify(options);
    if (loaded.key === key)
        return loaded;
    for (const c of loaded.contexts.values())
        await c.context.dispose();
    await loaded.model?.dispose();
    loaded = {key: null, model: null, contexts: new Map()};
    const model = await llama.loadModel({modelPath: options.path, vocabOnly: !!options.vocab_only, gpuLayers: 0});
    loaded = {key, model, contexts: new Map()};
    return loaded;
}

async function getSequences(options) {
    const key = JSON.stringify(options);
    let entry = loaded.contexts.get(key);
    if (entry === undefined) {
        const context = await loaded.model.createContext({
            contextSize: options.size, sequences: options.sequences, threads: options.threads,
            flashAttention: options.flash_attention, experimentalKvCacheKeyType: options.kv_type,
            experimentalKvCacheValueType: options.kv_type});
        const sequences = Array.from({length: options.sequences}, () => context.getSequence());
        entry = {context, sequences};
        loaded.contexts.set(key, entry);
    }
    for (const s of entry.sequences)
        await s.clearHistory();
    return entry.sequences;
}

const greedy = {temperature: 0};

// Feeds `tokens` to an empty sequence; `generate(i)` gives the generateNext options after position i (or null).
function evaluate(sequence, tokens, generate) {
    return sequence.controlledEvaluate(tokens.map((token, i) => {
        const next = generate(i);
        return next === null ? token : [token, {generateNext: next}];
    }));
}

// Log-probability of each next token without materialising the vocabulary's distribution at every position: that
// (`probabilities: true`) costs node-llama-cpp a sort, a JS array and a Map of the whole vocabulary per position
// (measured on SmolLM2's 49,152 tokens: ~40-75 ms per position, several times the forward pass), while sampling
// with `confidence` costs one sort (~5 ms) and a top-k list a fraction of a millisecond. So:
//   1. greedy with confidence: the argmax a and p(a), normalised over the whole vocabulary;
//   2. where the target t is not a: top-k probabilities with t's logit raised by BIAS, so that t is in the list
//      beside a. The list is normalised over its k entries only, but the ratio of two of its entries is exact:
//      log p(t) = log p(a) + log q(t) - log q(a) - BIAS (logit biases are additive, before the softmax);
//   3. the rare target still outside the list (or an end-of-generation token, whose bias node-llama-cpp ignores):
//      the full distribution at those positions only.
// Each pass evaluates the tokens again from an empty cache; the logits do not depend on the sampling options.
const TOP_K = 40, BIAS = 30;

async function score(model, sequence, tokens, options) {
    const topK = options.top_k ?? TOP_K, bias = options.bias ?? BIAS;
    const inputs = tokens.slice(0, -1), targets = tokens.slice(1);
    const n = inputs.length;
    const logProbs = new Array(n).fill(null), argmax = new Array(n);
    const first = await evaluate(sequence, inputs, () => ({token: true, confidence: true, options: greedy}));
    const second = [];
    for (let i = 0; i < n; i++) {
        argmax[i] = first[i].next.token;
        if (argmax[i] === targets[i])
            logProbs[i] = Math.log(first[i].next.confidence);
        else
            second.push(i);
    }
    const full = [];
    if (second.length > 0) {
        // node-llama-cpp ignores a bias on an end-of-generation token, so none is set (or subtracted) for one
        const biasAt = new Map(second.map((i) => [i, model.isEogToken(targets[i]) ? 0 : bias]));
        const topKOptions = (i) => ({temperature: 1, topK, topP: 1, minP: 0, seed: 0, tokenBias: biasAt.get(i) === 0
            ? undefined : new TokenBias(model.tokenizer).set(targets[i], {logit: biasAt.get(i)})});
        await sequence.clearHistory();
        const out = await evaluate(sequence, inputs,
                                   (i) => biasAt.has(i) ? {probabilities: true, options: topKOptions(i)} : null);
        for (const i of second) {
            const q = out[i].next.probabilities;
            const qt = q.get(targets[i]), qa = q.get(argmax[i]);
            if (qt > 0 && qa > 0)
                logProbs[i] = Math.log(first[i].next.confidence) + Math.log(qt) - Math.log(qa) - biasAt.get(i);
            else
                full.push(i);
        }
    }
    if (full.length > 0) {
        const wanted = new Set(full);
        await sequence.clearHistory();
        const out = await evaluate(sequence, inputs,
                                   (i) => wanted.has(i) ? {probabilities: true, options: greedy} : null);
        for (const i of full) {
            const p = out[i].next.probabilities.get(targets[i]) ?? 0;
            logProbs[i] = p > 0 ? Math.log(p) : null;  // null: float32 underflow (JSON has no -Infinity)
        }
    }
    return {log_probs: logProbs, argmax, second: second.length, full: full.length};
}

// Greedy decoding of every prompt at once, one sequence each, through node-llama-cpp's generation loop (one sampler
// per sequence, the next token fed back), timed here so that no inter-process time enters the figures.
async function timedDecode(sequences, prompts, steps) {
    const t0 = performance.now();
    return Promise.all(prompts.map(async (prompt, s) => {
        const tokens = [], times = [];
        const generator = sequences[s].evaluate(prompt, {temperature: 0, yieldEogToken: true});
        for await (const token of generator) {
            tokens.push(token);
            times.push(performance.now() - t0);
            if (tokens.length >= steps)
                break;
        }
        return {tokens, times};
    }));
}

async function run(task) {
    const {model} = await loadModel(task.model);
    if (task.op === "tokenize")
        return task.texts.map((text) => Array.from(model.tokenize(text, task.special)));
    if (task.model.vocab_only)
        throw new Error(`${task.op} needs the weights; the model was loaded with vocab_only`);
    if (task.op === "timed_decode") {
        const sequences = await getSequences({...task.context, sequences: task.prompts.length});
        const streams = await timedDecode(sequences, task.prompts, task.steps);
        return {tokens: streams.map((s) => s.tokens), times_ms: streams.map((s) => s.times)};
    }
    const [sequence] = await getSequences(task.context);
    if (task.op === "score")
        return score(model, sequence, task.tokens, task);
    if (task.op === "probs") {
        const out = await evaluate(sequence, task.tokens, () => ({token: true, probabilities: true, options: greedy}));
        return out.map((o) => [Array.from(o.next.probabilities.keys()), Array.from(o.next.probabilities.values())]);
    }
    if (task.op === "greedy") {
        const tokens = [];
        let out = await evaluate(sequence, task.prompt,
                                 (i) => i === task.prompt.length - 1 ? {token: true, options: greedy} : null);
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
