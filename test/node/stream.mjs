// Streams one chat completion from Loraplex's OpenAI-compatible HTTP edge with the official openai
// package and checks it: the first chunk names the assistant role, the text is EXPECT, the stream
// ends with a finish reason, then the usage (stream_options.include_usage). test/openai's
// TestNodeClient runs it against a real router with OPENAI_BASE_URL, OPENAI_API_KEY, MODEL, INPUT
// and EXPECT set; it exits non-zero on any difference.
import OpenAI from "openai";

const env = (name) => {
  const v = process.env[name];
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};

const client = new OpenAI({ baseURL: env("OPENAI_BASE_URL"), apiKey: env("OPENAI_API_KEY"), maxRetries: 0, timeout: 30000 });
const stream = await client.chat.completions.create({
  model: env("MODEL"),
  messages: [
    { role: "system", content: "you transform text" },
    { role: "user", content: env("INPUT") },
  ],
  max_completion_tokens: 32,
  temperature: 0,
  stream: true,
  stream_options: { include_usage: true },
});

let text = "";
let role = "";
let finish = null;
let usage = null;
let chunks = 0;
for await (const chunk of stream) {
  if (chunks++ === 0) role = chunk.choices[0]?.delta?.role ?? "";
  if (chunk.usage) usage = chunk.usage;
  for (const c of chunk.choices) {
    text += c.delta?.content ?? "";
    if (c.finish_reason) finish = c.finish_reason;
  }
}

const failures = [];
if (role !== "assistant") failures.push(`first chunk role ${JSON.stringify(role)}, want "assistant"`);
if (text !== env("EXPECT")) failures.push(`text ${JSON.stringify(text)}, want ${JSON.stringify(env("EXPECT"))}`);
if (finish !== "stop" && finish !== "length") failures.push(`finish_reason ${finish}`);
if (!usage || usage.completion_tokens < 1 || usage.total_tokens !== usage.prompt_tokens + usage.completion_tokens) {
  failures.push(`usage ${JSON.stringify(usage)}`);
}
console.log(JSON.stringify({ chunks, text, finish, usage }));
if (failures.length > 0) {
  console.error(failures.join("\n"));
  process.exit(1);
}
