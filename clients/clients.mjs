// Drives a custom LLM endpoint with the official Node clients, each at its default call, and prints
// one JSON line per call: {client, call, ok, text, toolCalls, error}. Used by tests/test_clients.py.
//
//   node clients.mjs <base URL, e.g. http://127.0.0.1:8000/rag> <key> plain|tools
import OpenAI from "openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, jsonSchema, streamText, tool } from "ai";

const [baseURL, apiKey, calls] = process.argv.slice(2);
const messages = [{ role: "user", content: "Hello there" }];
const lookupOrder = {
  type: "function",
  function: { name: "lookup_order", description: "Find an order", parameters: { type: "object", properties: { order_id: { type: "string" } } } },
};

async function attempt(client, call, run) {
  if (call.endsWith("tools") !== (calls === "tools")) return;
  try {
    const result = await run();
    console.log(JSON.stringify({ client, call, ok: true, ...result }));
  } catch (error) {
    console.log(JSON.stringify({ client, call, ok: false, error: String(error && error.message || error) }));
  }
}

const openai = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
await attempt("openai-node", "create", async () => {
  const completion = await openai.chat.completions.create({ model: "m", messages });
  const message = completion.choices[0].message;
  return { text: message.content ?? message.audio?.transcript ?? "" };
});
await attempt("openai-node", "create stream", async () => {
  let text = "";
  for await (const chunk of await openai.chat.completions.create({ model: "m", messages, stream: true })) {
    const delta = chunk.choices[0]?.delta ?? {};
    text += delta.content ?? delta.audio?.transcript ?? "";
  }
  return { text };
});
await attempt("openai-node", "create tools", async () => {
  const completion = await openai.chat.completions.create({ model: "m", messages, tools: [lookupOrder] });
  return { toolCalls: (completion.choices[0].message.tool_calls ?? []).map((call) => call.function.name) };
});

const provider = createOpenAICompatible({ name: "custom-llm", baseURL, apiKey });
const orderTool = { lookup_order: tool({ description: "Find an order", inputSchema: jsonSchema({ type: "object", properties: { order_id: { type: "string" } } }) }) };
await attempt("ai-sdk", "generateText", async () => {
  const result = await generateText({ model: provider.chatModel("m"), prompt: "Hello there", maxRetries: 0 });
  return { text: result.text };
});
await attempt("ai-sdk", "streamText", async () => {
  const result = streamText({ model: provider.chatModel("m"), prompt: "Hello there", maxRetries: 0 });
  let text = "";
  for await (const part of result.fullStream) {
    if (part.type === "error") throw part.error;
    if (part.type === "text-delta") text += part.text ?? part.delta ?? "";
  }
  return { text };
});
await attempt("ai-sdk", "generateText tools", async () => {
  const result = await generateText({ model: provider.chatModel("m"), prompt: "Where is order 7?", tools: orderTool, maxRetries: 0 });
  return { toolCalls: result.toolCalls.map((call) => call.toolName) };
});
