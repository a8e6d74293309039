// The openai Node SDK as an application writes it: base URL left at api.openai.com.
import OpenAI from "openai";

const client = new OpenAI({ apiKey: process.env.CLIENT_KEY, maxRetries: 0, timeout: 20000 });
const raw = await client.chat.completions.create(
  { model: "gpt-4o", messages: [{ role: "user", content: "hi" }] }).withResponse();
const out = { provider: raw.response.headers.get("x-arbstr-provider"), content: raw.data.choices[0].message.content };
const stream = await client.chat.completions.create(
  { model: "gpt-4o", messages: [{ role: "user", content: "hi" }], stream: true });
out.streamed = "";
for await (const chunk of stream) out.streamed += chunk.choices[0]?.delta?.content ?? "";
console.log(JSON.stringify(out));
