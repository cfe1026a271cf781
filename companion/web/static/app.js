// The chat page. It signs in with an API key, which the server trades for a session held in an
// HttpOnly cookie, then uses the same /v1 API as any client. Changes carry the session's CSRF token.
// User text only ever reaches the page through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  csrf: null,
  personalities: [],
  conversation: null, // {id, personality, title} of the open conversation
  draft: null, // the personality chosen for a conversation not created yet
  oldestMessageId: null,
  streaming: false,
  reply: null, // the reply streaming now: {conversationId, messageId, lastId, ended}
  editing: null, // name of the personality being edited
  promptTokens: 0, // the newest reply's prompt size: how full the context is
  turns: 0, // counts turns started here: a message list fetched before one began is out of date
};

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// --- talking to the server -----------------------------------------------------------------

async function errorFrom(response) {
  let message = `The server answered ${response.status}.`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      code = body.error.code;
    }
  } catch {
    // not JSON: keep the generic message
  }
  const retry = response.headers.get("Retry-After");
  if ((response.status === 429 || response.status === 503) && retry) {
    message += ` Try again in ${retry} s.`;
  }
  return new ApiError(response.status, message, code);
}

function headersFor(method, hasBody) {
  const headers = { Accept: "application/json" };
  if (hasBody) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  return headers;
}

async function request(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headersFor(method, body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
  } catch {
    throw new ApiError(0, "Cannot reach the server. Check your connection and try again.", "network");
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401 && !path.startsWith("/web/")) signedOut("Your session has ended; sign in again.");
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

const api = {
  get: (path) => request("GET", path),
  post: (path, body) => request("POST", path, body),
  put: (path, body) => request("PUT", path, body),
  patch: (path, body) => request("PATCH", path, body),
  delete: (path) => request("DELETE", path),
};

// Server-Sent Events from a fetch response: yields {event, data, id} as each event completes.
async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let id = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("id:")) id = line.slice(3).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")), id };
    }
  }
}

// --- small DOM helpers -----------------------------------------------------------------------

function el(tag, options = {}, children = []) {
  const node = document.createElement(tag);
  if (options.className) node.className = options.className;
  if (options.text !== undefined) node.textContent = options.text;
  for (const [name, value] of Object.entries(options.attrs || {})) node.setAttribute(name, value);
  if (options.onClick) node.addEventListener("click", options.onClick);
  for (const child of children) node.append(child);
  return node;
}

function button(label, onClick, className = "ghost small", attrs = {}) {
  return el("button", { text: label, className, onClick, attrs: { type: "button", ...attrs } });
}

function showError(error) {
  const message = error instanceof Error ? error.message : String(error);
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// Run an action from a click or a submit, showing any failure to the user.
function guarded(action) {
  return async (event) => {
    if (event && event.type === "submit") event.preventDefault();
    clearError();
    try {
      await action(event);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) showError(error);
    }
  };
}

function when(iso) {
  const date = new Date(iso);
  const today = new Date();
  if (date.toDateString() === today.toDateString()) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  return date.toLocaleDateString([], { day: "numeric", month: "short" });
}

function personality(name) {
  return state.personalities.find((p) => p.name === name);
}

function displayName(name) {
  const found = personality(name);
  return found ? found.display_name : name;
}

// --- signing in and out ----------------------------------------------------------------------

function showSignIn(message) {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").hidden = !message;
  $("signin-error").textContent = message || "";
  $("api-key").focus();
}

function signedOut(message) {
  state.csrf = null;
  state.conversation = null;
  state.draft = null;
  history.replaceState(null, "", location.pathname);
  showSignIn(message);
}

async function signIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  $("signin-button").disabled = true;
  $("signin-error").hidden = true;
  try {
    const session = await api.post("/web/session", { api_key: key });
    $("api-key").value = "";
    await start(session);
  } catch (error) {
    $("signin-error").textContent = error.message;
    $("signin-error").hidden = false;
  } finally {
    $("signin-button").disabled = false;
  }
}

async function signOut() {
  try {
    await api.post("/web/signout");
  } finally {
    signedOut("You are signed out.");
  }
}

async function start(session) {
  state.csrf = session.csrf_token;
  $("signin").hidden = true;
  $("app").hidden = false;
  $("app").setAttribute("aria-busy", "true");
  try {
    await loadPersonalities(); // first: the conversation list shows their display names
    await loadConversations();
    const match = location.hash.match(/^#c=([0-9a-f-]{36})$/);
    if (match) await openConversation(match[1]);
    else newChat();
  } finally {
    $("app").removeAttribute("aria-busy");
  }
}

// --- the degraded-service notice ---------------------------------------------------------------

const CHECK_NAMES = { database: "the database", redis: "the Redis cache", llm: "the language model" };
const FINE = new Set(["ok", "disabled"]);

async function checkHealth() {
  const notice = $("notice");
  try {
    const response = await fetch("/health", { headers: { Accept: "application/json" } });
    const body = await response.json();
    if (body.status === "ok") {
      notice.hidden = true;
      return;
    }
    const failing = Object.entries(body.checks || {})
      .filter(([, check]) => !FINE.has(check.status))
      .map(([name]) => CHECK_NAMES[name] || name);
    const which = failing.length ? ` (${failing.join(", ")})` : "";
    notice.textContent =
      response.status === 503
        ? "The service cannot reach its database right now; messages cannot be sent until it is back."
        : `The service is running in a degraded mode${which}. Chat keeps working; some things may be slower.`;
    notice.hidden = false;
  } catch {
    notice.textContent = "Cannot reach the server right now.";
    notice.hidden = false;
  }
}

// --- layout: views and the drawer ----------------------------------------------------------------

function setDrawer(open) {
  document.body.classList.toggle("drawer-open", open);
  $("scrim").hidden = !open;
  $("menu").setAttribute("aria-expanded", String(open));
}

function showView(name) {
  for (const view of ["chat", "personalities", "preferences", "memories"]) {
    $(`view-${view}`).hidden = view !== name;
  }
  for (const item of document.querySelectorAll(".nav button")) {
    if (item.dataset.view === name) item.setAttribute("aria-current", "page");
    else item.removeAttribute("aria-current");
  }
  setDrawer(false);
  clearError();
  if (name !== "chat") {
    $("title").textContent = { personalities: "Personalities", preferences: "Preferences", memories: "Memories" }[name];
    $("subtitle").textContent = "";
    markActiveConversation(null);
  }
}

// --- personalities -------------------------------------------------------------------------------

async function loadPersonalities() {
  state.personalities = await api.get("/v1/personalities");
  renderPicker();
  renderPersonalityList();
}

function avatar(name) {
  const label = displayName(name);
  return el("span", { className: "avatar", text: label.charAt(0).toUpperCase(), attrs: { "aria-hidden": "true" } });
}

function renderPicker() {
  const list = $("picker-list");
  list.replaceChildren();
  for (const p of state.personalities) {
    const card = el("button", { className: "card pick", attrs: { type: "button" }, onClick: () => choosePersonality(p.name) }, [
      el("span", { className: "card-head" }, [
        avatar(p.name),
        el("strong", { text: p.display_name }),
        p.scope === "user" ? el("span", { className: "badge", text: "yours" }) : "",
      ]),
      el("span", { className: "card-text", text: p.description }),
    ]);
    list.append(el("li", {}, [card]));
  }
}

function renderPersonalityList() {
  const list = $("personality-list");
  list.replaceChildren();
  for (const p of state.personalities) {
    const actions = el("div", { className: "row" }, [button("Chat", () => choosePersonality(p.name), "primary small")]);
    actions.append(
      el("a", {
        className: "button ghost small export-card",
        text: "Export card",
        attrs: { href: `/v1/personalities/${encodeURIComponent(p.name)}/export`, download: "" },
      }),
    );
    if (p.scope === "user") {
      actions.append(
        button("Edit", () => editPersonality(p)),
        button("Delete", guarded(() => deletePersonality(p)), "ghost small danger-text"),
      );
    } else {
      actions.append(button("Make my own version", () => editPersonality(p, { copy: true })));
    }
    list.append(
      el("li", { className: "card", attrs: { "data-name": p.name } }, [
        el("div", { className: "card-head" }, [
          avatar(p.name),
          el("strong", { text: p.display_name }),
          el("span", { className: "badge", text: p.scope === "user" ? "yours" : "built-in" }),
          el("code", { className: "muted", text: p.name }),
        ]),
        el("p", { className: "card-text", text: p.description }),
        actions,
      ]),
    );
  }
}

function editPersonality(p, { copy = false } = {}) {
  state.editing = copy ? null : p.name;
  $("personality-form-title").textContent = copy ? `Your own version of ${p.display_name}` : `Edit ${p.display_name}`;
  $("p-name").value = p.name;
  $("p-name").readOnly = !copy;
  $("p-display-name").value = p.display_name;
  $("p-description").value = p.description;
  $("p-system-prompt").value = p.system_prompt;
  $("p-save").textContent = copy ? "Create" : "Save";
  $("p-cancel").hidden = false;
  $("personality-form").scrollIntoView({ behavior: "smooth", block: "start" });
  $("p-display-name").focus();
}

function resetPersonalityForm() {
  state.editing = null;
  $("personality-form").reset();
  $("p-name").readOnly = false;
  $("personality-form-title").textContent = "Create your own";
  $("p-save").textContent = "Create";
  $("p-cancel").hidden = true;
}

async function savePersonality() {
  const fields = {
    display_name: $("p-display-name").value.trim() || null,
    description: $("p-description").value.trim(),
    system_prompt: $("p-system-prompt").value.trim(),
  };
  if (state.editing) {
    await api.patch(`/v1/personalities/${encodeURIComponent(state.editing)}`, fields);
  } else {
    await api.post("/v1/personalities", { name: $("p-name").value.trim(), ...fields });
  }
  resetPersonalityForm();
  await loadPersonalities();
}

async function deletePersonality(p) {
  if (!confirm(`Delete your personality “${p.display_name}”?`)) return;
  await api.delete(`/v1/personalities/${encodeURIComponent(p.name)}`);
  await loadPersonalities();
}

// --- conversations -------------------------------------------------------------------------------

async function loadConversations() {
  const page = await api.get("/v1/conversations?limit=100");
  const list = $("conversations");
  list.replaceChildren();
  for (const c of page.data) {
    const open = el("button", { className: "conversation", attrs: { type: "button" }, onClick: guarded(() => openConversation(c.id)) }, [
      el("span", { className: "conversation-title", text: c.title || "New conversation" }),
      el("span", { className: "conversation-meta", text: `${displayName(c.personality)} · ${when(c.updated_at)}` }),
    ]);
    const remove = button("×", guarded(() => deleteConversation(c)), "icon-button delete", {
      "aria-label": `Delete conversation ${c.title || ""}`.trim(),
      title: "Delete conversation",
    });
    list.append(el("li", { attrs: { "data-id": c.id } }, [open, remove]));
  }
  $("conversations-empty").hidden = page.data.length > 0;
  markActiveConversation(state.conversation && state.conversation.id);
}

function markActiveConversation(id) {
  for (const item of $("conversations").children) {
    item.classList.toggle("active", item.dataset.id === id);
  }
}

function setChatHeader() {
  const name = state.conversation ? state.conversation.personality : state.draft;
  $("conversation-tools").hidden = !state.conversation;
  if (state.conversation) {
    const base = `/v1/conversations/${state.conversation.id}/export`;
    $("export-json").href = base;
    $("export-json").download = `conversation-${state.conversation.id}.json`;
    $("export-markdown").href = `${base}?format=markdown`;
    $("export-markdown").download = `conversation-${state.conversation.id}.md`;
  }
  $("title").textContent = name ? displayName(name) : "New chat";
  $("subtitle").textContent = state.conversation ? state.conversation.title || "" : name ? "New conversation" : "";
}

function newChat() {
  state.conversation = null;
  state.draft = null;
  history.replaceState(null, "", location.pathname);
  showView("chat");
  $("picker").hidden = false;
  $("thread").hidden = true;
  $("composer").hidden = true;
  $("messages").replaceChildren();
  setChatHeader();
}

function choosePersonality(name) {
  if (hasGreeting(name)) {
    // A character card's greeting opens the conversation: create it now and show the greeting.
    guarded(async () => {
      const created = await api.post("/v1/conversations", { personality: name });
      await loadConversations();
      await openConversation(created.id);
    })();
    return;
  }
  newChat();
  state.draft = name;
  $("picker").hidden = true;
  $("thread").hidden = false;
  $("composer").hidden = false;
  $("load-earlier").hidden = true;
  $("thread-empty").textContent = `Say hello to ${displayName(name)}.`;
  $("thread-empty").hidden = false;
  setChatHeader();
  $("message").focus();
}

async function openConversation(id) {
  let conversation;
  try {
    conversation = await api.get(`/v1/conversations/${id}`);
  } catch (error) {
    if (error.status === 404 || error.status === 422) {
      newChat();
      return;
    }
    throw error;
  }
  state.conversation = conversation;
  state.draft = null;
  history.replaceState(null, "", `#c=${conversation.id}`);
  showView("chat");
  $("picker").hidden = true;
  $("thread").hidden = false;
  $("composer").hidden = false;
  setChatHeader();
  markActiveConversation(conversation.id);
  await loadMessages();
  $("message").focus();
}

async function deleteConversation(c) {
  if (!confirm(`Delete the conversation “${c.title || "New conversation"}” and all its messages?`)) return;
  await api.delete(`/v1/conversations/${c.id}`);
  if (state.conversation && state.conversation.id === c.id) newChat();
  await loadConversations();
}

// --- messages --------------------------------------------------------------------------------------

const STATUS_NOTES = {
  stopped: "Stopped.",
  incomplete: "The reply stopped early.",
  error: "The model failed while answering.",
};

function messageItem(role, content, status = "complete", message = null) {
  const name = state.conversation ? state.conversation.personality : state.draft;
  const text = el("div", { className: "text", text: content });
  const bubble = el("div", { className: "bubble" }, [text]);
  const item = el("li", { className: `message ${role}`, attrs: { "data-status": status } }, [
    role === "assistant" ? avatar(name) : "",
    bubble,
  ]);
  if (STATUS_NOTES[status]) bubble.append(el("p", { className: "status-note", text: STATUS_NOTES[status] }));
  if (message) {
    item.dataset.id = message.id;
    bubble.append(messageTools(item, message));
  }
  return item;
}

// Swipe between alternatives, regenerate a reply, edit one of your messages; token usage.
function messageTools(item, m) {
  const tools = el("div", { className: "message-tools" });
  const siblings = m.siblings || [m.id];
  if (siblings.length > 1) {
    const at = siblings.indexOf(m.id);
    const noun = m.role === "user" ? "version" : "reply";
    const go = (index) => guarded(() => activate(siblings[index]));
    tools.append(
      button("‹", go(at - 1), "ghost small swipe-prev", { "aria-label": `Previous ${noun}`, ...(at === 0 ? { disabled: "" } : {}) }),
      el("span", { className: "swipe-count", text: `${at + 1}/${siblings.length}` }),
      button("›", go(at + 1), "ghost small swipe-next", {
        "aria-label": `Next ${noun}`,
        ...(at === siblings.length - 1 ? { disabled: "" } : {}),
      }),
    );
  }
  if (m.role === "assistant" && m.parent_id !== null) {
    tools.append(button("Regenerate", guarded(() => regenerate(item, m)), "ghost small regenerate"));
  }
  if (m.role === "user") tools.append(button("Edit", () => startEdit(item, m), "ghost small edit"));
  if (m.role === "assistant" && m.prompt_tokens !== null && m.prompt_tokens !== undefined) {
    tools.append(el("span", { className: "token-note", text: `${m.prompt_tokens + m.completion_tokens} tokens` }));
  }
  return tools;
}

function removeFrom(item) {
  while (item.nextSibling) item.nextSibling.remove();
  item.remove();
}

async function activate(messageId) {
  if (state.streaming) return;
  await api.post(`/v1/conversations/${state.conversation.id}/messages/${messageId}/activate`);
  await loadMessages();
}

async function regenerate(item, m) {
  if (state.streaming) return;
  setStreaming(true);
  try {
    removeFrom(item);
    await streamReply(state.conversation.id, null, `/v1/conversations/${state.conversation.id}/messages/${m.id}/regenerate`, {});
  } finally {
    setStreaming(false);
    await refreshThread();
  }
}

function startEdit(item, m) {
  if (state.streaming) return;
  const bubble = item.querySelector(".bubble");
  const box = el("textarea", { className: "edit-box", attrs: { "aria-label": "Edit your message", maxlength: "8000" } });
  box.value = m.content;
  const save = button("Send edit", guarded(() => sendEdit(item, m, box.value.trim())), "primary small edit-send");
  const cancel = button("Cancel", () => loadMessages().catch(showError), "ghost small");
  bubble.replaceChildren(box, el("div", { className: "row" }, [save, cancel]));
  box.focus();
}

async function sendEdit(item, m, content) {
  if (!content || state.streaming) return;
  setStreaming(true);
  try {
    removeFrom(item);
    $("messages").append(messageItem("user", content));
    await streamReply(state.conversation.id, content, `/v1/conversations/${state.conversation.id}/messages/${m.id}/edit`);
  } finally {
    setStreaming(false);
    await refreshThread();
  }
}

// The messages again (with their ids and alternatives), the usage, and the sidebar's titles.
async function refreshThread() {
  if (!state.conversation) return;
  await loadMessages().catch(showError);
  if (state.csrf) loadConversations().catch(showError);
}

// --- usage ---------------------------------------------------------------------------------------

async function loadUsage() {
  const usage = await api.get("/v1/usage?days=1&months=1");
  const parts = [];
  if (state.conversation && state.promptTokens) {
    parts.push(`Context ${Math.min(100, Math.round((100 * state.promptTokens) / usage.context_tokens))}% full`);
  }
  const today = usage.days[usage.days.length - 1].total_tokens;
  const daily = usage.quotas.find((q) => q.window === "daily");
  const monthly = usage.quotas.find((q) => q.window === "monthly");
  parts.push(`${today.toLocaleString()} tokens today`);
  if (daily) parts.push(`${daily.remaining.toLocaleString()} left today`);
  if (monthly) parts.push(`${monthly.remaining.toLocaleString()} left this month`);
  $("usage").textContent = parts.join(" · ");
  $("usage").hidden = false;
}

// --- import and export ---------------------------------------------------------------------------

async function upload(path, file) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: { ...headersFor("POST", false), "Content-Type": file.type || "application/octet-stream" },
      body: file,
      credentials: "same-origin",
    });
  } catch {
    throw new ApiError(0, "Cannot reach the server. Check your connection and try again.", "network");
  }
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

async function importCard(file) {
  const created = await upload("/v1/personalities/import", file);
  await loadPersonalities();
  flash(`Imported ${created.display_name}.`);
}

async function importChats(file) {
  const created = await upload("/v1/conversations/import", file);
  await loadConversations();
  flash(`Imported ${created.length} conversation${created.length === 1 ? "" : "s"}.`);
  if (created.length) await openConversation(created[0].id);
}

function flash(message) {
  $("notice").textContent = message;
  $("notice").hidden = false;
  setTimeout(() => {
    if ($("notice").textContent === message) $("notice").hidden = true;
  }, 4000);
}

function hasGreeting(name) {
  const found = personality(name);
  return Boolean(found && found.card && (found.card.data.first_mes || (found.card.data.alternate_greetings || []).length));
}

function settleItem(item, status) {
  item.dataset.status = status;
  if (STATUS_NOTES[status] && !item.querySelector(".status-note")) {
    item.querySelector(".bubble").append(el("p", { className: "status-note", text: STATUS_NOTES[status] }));
  }
}

function scrollToEnd() {
  const thread = $("thread");
  thread.scrollTop = thread.scrollHeight;
}

async function loadMessages() {
  const conversationId = state.conversation.id;
  const turns = state.turns;
  const page = await api.get(`/v1/conversations/${conversationId}/messages?limit=100`);
  // A turn begun (or another conversation opened) while this list was on its way has changed the
  // thread since: showing the list would drop the reply streaming in. The turn refreshes it after.
  if (state.turns !== turns || !state.conversation || state.conversation.id !== conversationId) return;
  $("messages").replaceChildren(...page.data.map((m) => messageItem(m.role, m.content, m.status, m)));
  const replies = page.data.filter((m) => m.role === "assistant" && m.prompt_tokens !== null);
  state.promptTokens = replies.length ? replies[replies.length - 1].prompt_tokens : 0;
  loadUsage().catch(() => {});
  state.oldestMessageId = page.data.length ? page.data[0].id : null;
  $("load-earlier").hidden = !page.has_more;
  $("thread-empty").textContent = `Say hello to ${displayName(state.conversation.personality)}.`;
  $("thread-empty").hidden = page.data.length > 0;
  scrollToEnd();
  const last = page.data[page.data.length - 1];
  if (last && last.role === "assistant" && last.status === "streaming" && !state.streaming) {
    // Still being generated (the page was reloaded, or opened elsewhere): follow it from the text
    // shown. Event ids count characters (code points), as Array.from does.
    const item = $("messages").lastElementChild;
    const progress = {
      conversationId: state.conversation.id,
      messageId: last.id,
      lastId: String(Array.from(last.content).length),
      ended: false,
    };
    setStreaming(true, progress);
    resumeReply(item, progress)
      .catch(showError)
      .finally(() => setStreaming(false));
  }
}

async function loadEarlier() {
  const id = state.conversation.id;
  const page = await api.get(`/v1/conversations/${id}/messages?limit=100&before=${state.oldestMessageId}`);
  $("messages").prepend(...page.data.map((m) => messageItem(m.role, m.content, m.status, m)));
  if (page.data.length) state.oldestMessageId = page.data[0].id;
  $("load-earlier").hidden = !page.has_more;
}

function setStreaming(on, reply = null) {
  if (on && !state.streaming) state.turns += 1;
  state.streaming = on;
  state.reply = on ? reply : null;
  $("send").disabled = on;
  $("composer").classList.toggle("busy", on);
  $("stop").hidden = !(on && reply && reply.messageId !== null);
}

async function stopReply() {
  const reply = state.reply;
  if (!reply || reply.messageId === null) return;
  $("stop").disabled = true;
  try {
    // The stream then ends by itself with the reply's final state.
    await api.post(`/v1/conversations/${reply.conversationId}/messages/${reply.messageId}/stop`);
  } finally {
    $("stop").disabled = false;
  }
}

function titleFrom(content) {
  const line = content.split("\n")[0].trim();
  if (line.length <= 60) return line;
  const cut = line.slice(0, 60);
  return `${cut.slice(0, cut.lastIndexOf(" ") > 30 ? cut.lastIndexOf(" ") : 60)}…`;
}

async function sendMessage() {
  const input = $("message");
  const content = input.value.trim();
  if (!content || state.streaming) return;
  setStreaming(true);
  try {
    if (!state.conversation) {
      const title = titleFrom(content);
      state.conversation = await api.post("/v1/conversations", { personality: state.draft, title });
      state.draft = null;
      history.replaceState(null, "", `#c=${state.conversation.id}`);
      setChatHeader();
    }
    input.value = "";
    resizeComposer();
    $("thread-empty").hidden = true;
    $("messages").append(messageItem("user", content));
    await streamReply(state.conversation.id, content);
  } finally {
    setStreaming(false);
    await refreshThread();
  }
}

async function streamReply(conversationId, content, path = null, body = { content }) {
  const reply = messageItem("assistant", "", "streaming");
  $("messages").append(reply);
  scrollToEnd();
  let response;
  try {
    response = await fetch(path || `/v1/conversations/${conversationId}/messages`, {
      method: "POST",
      headers: { ...headersFor("POST", true), Accept: "text/event-stream" },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
  } catch {
    reply.remove();
    throw new ApiError(0, "Cannot reach the server. Check your connection and try again.", "network");
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401) signedOut("Your session has ended; sign in again.");
    else await loadMessages().catch(() => {}); // shows what the server kept (the message may be stored)
    throw error;
  }
  const progress = { conversationId, messageId: null, lastId: null, ended: false };
  setStreaming(true, progress);
  try {
    await readReply(reply, response, progress);
  } catch {
    // The connection dropped; the reply goes on on the server: pick it up below.
  }
  if (!progress.ended) await resumeReply(reply, progress);
}

// Read a reply's events into its item; `progress` remembers the last event id, to resume after it.
async function readReply(reply, response, progress) {
  const text = reply.querySelector(".text");
  for await (const { event, data, id } of readEvents(response.body)) {
    if (id !== null) progress.lastId = id;
    if (event === "message") {
      progress.messageId = data.message_id;
      setStreaming(true, progress); // the Stop button needs the reply's id
    } else if (event === "token") {
      text.textContent += data.text;
      scrollToEnd();
    } else if (event === "done") {
      progress.ended = true;
      text.textContent = data.content;
      settleItem(reply, data.finish_reason === "stopped" ? "stopped" : "complete");
    } else if (event === "error") {
      progress.ended = true;
      const interrupted = data.error.code === "reply_interrupted";
      // Its server died: show the text kept (a little of what arrived may not have been saved).
      if (interrupted && typeof data.content === "string") text.textContent = data.content;
      settleItem(reply, interrupted ? "incomplete" : "error");
      if (!interrupted) showError(data.error.message);
    }
  }
}

// Resume a reply after a lost connection or a reload: the server replays what came after the last
// event received (Last-Event-ID) and follows the rest live, so no text is shown twice.
async function resumeReply(reply, progress) {
  const url = `/v1/conversations/${progress.conversationId}/messages/${progress.messageId}/stream`;
  for (let attempt = 0; attempt < 6 && !progress.ended && progress.messageId !== null; attempt++) {
    if (attempt) await new Promise((resolve) => setTimeout(resolve, 500 * attempt));
    const headers = { Accept: "text/event-stream" };
    if (progress.lastId !== null) headers["Last-Event-ID"] = progress.lastId;
    let response;
    try {
      response = await fetch(url, { headers, credentials: "same-origin" });
    } catch {
      continue;
    }
    if (response.status === 401) {
      signedOut("Your session has ended; sign in again.");
      return;
    }
    if (response.status === 404) break;
    if (!response.ok) continue;
    try {
      await readReply(reply, response, progress);
    } catch {
      // dropped again: try again
    }
  }
  if (!progress.ended) {
    settleItem(reply, "incomplete");
    throw new ApiError(0, "The connection dropped mid-reply; reload the page to see the rest of it.", "network");
  }
}

function resizeComposer() {
  const input = $("message");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
}

// --- preferences ---------------------------------------------------------------------------------

async function loadPreferences() {
  const prefs = await api.get("/v1/preferences");
  $("pref-name").value = prefs.preferred_name || "";
  $("pref-length").value = prefs.reply_length;
  $("pref-language").value = prefs.language || "";
  $("pref-tone").value = prefs.tone;
  $("pref-interests").value = prefs.interests.join(", ");
  $("pref-memory").checked = prefs.memory_enabled;
  $("preferences-status").textContent = "";
}

async function savePreferences() {
  const interests = $("pref-interests")
    .value.split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  await api.put("/v1/preferences", {
    preferred_name: $("pref-name").value.trim() || null,
    reply_length: $("pref-length").value,
    language: $("pref-language").value.trim() || null,
    tone: $("pref-tone").value,
    interests,
    memory_enabled: $("pref-memory").checked,
  });
  $("preferences-status").textContent = "Saved.";
}

// --- memories ------------------------------------------------------------------------------------

async function loadMemories() {
  const query = $("memory-query").value.trim();
  const path = query ? `/v1/memories?limit=100&query=${encodeURIComponent(query)}` : "/v1/memories?limit=100";
  const page = await api.get(path);
  const list = $("memory-list");
  list.replaceChildren();
  for (const m of page.data) {
    list.append(
      el("li", { className: "memory", attrs: { "data-id": m.id } }, [
        el("div", {}, [
          el("p", { className: "memory-text", text: m.text }),
          el("p", { className: "memory-meta", text: `${m.kind === "episode" ? "you said" : m.kind} · ${when(m.said_at || m.updated_at)}` }),
        ]),
        button("Delete", guarded(() => deleteMemory(m)), "ghost small danger-text", { "aria-label": `Delete memory: ${m.text}` }),
      ]),
    );
  }
  $("memory-empty").textContent = query ? "No memory matches that search." : "Nothing remembered yet.";
  $("memory-empty").hidden = page.data.length > 0;
  $("forget-all").disabled = page.data.length === 0 && !query;
}

async function deleteMemory(m) {
  await api.delete(`/v1/memories/${m.id}`);
  await loadMemories();
}

async function forgetEverything() {
  if (!confirm("Forget everything companions remember about you? This cannot be undone.")) return;
  await api.delete("/v1/memories");
  $("memory-query").value = "";
  await loadMemories();
}

// --- wiring ----------------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", guarded(signOut));
  $("error-close").addEventListener("click", clearError);
  $("menu").addEventListener("click", () => setDrawer(!document.body.classList.contains("drawer-open")));
  $("scrim").addEventListener("click", () => setDrawer(false));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && document.body.classList.contains("drawer-open")) setDrawer(false);
  });
  $("new-chat").addEventListener("click", newChat);
  const loaders = { personalities: loadPersonalities, preferences: loadPreferences, memories: loadMemories };
  for (const item of document.querySelectorAll(".nav button")) {
    // Load first, then show: a form never fills in under the user's typing.
    item.addEventListener(
      "click",
      guarded(async () => {
        await loaders[item.dataset.view]();
        showView(item.dataset.view);
      }),
    );
  }
  $("composer").addEventListener("submit", guarded(sendMessage));
  $("stop").addEventListener("click", guarded(stopReply));
  $("message").addEventListener("input", resizeComposer);
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("load-earlier").addEventListener("click", guarded(loadEarlier));
  $("personality-form").addEventListener("submit", guarded(savePersonality));
  $("p-cancel").addEventListener("click", resetPersonalityForm);
  $("p-new").addEventListener("click", () => {
    resetPersonalityForm();
    $("personality-form").scrollIntoView({ behavior: "smooth", block: "start" });
    $("p-name").focus();
  });
  $("preferences-form").addEventListener("submit", guarded(savePreferences));
  $("memory-search").addEventListener("submit", guarded(loadMemories));
  $("memory-refresh").addEventListener("click", guarded(loadMemories));
  $("forget-all").addEventListener("click", guarded(forgetEverything));
  $("import-card").addEventListener("click", () => $("card-file").click());
  $("card-file").addEventListener(
    "change",
    guarded(async () => {
      const file = $("card-file").files[0];
      $("card-file").value = "";
      if (file) await importCard(file);
    }),
  );
  $("import-chats").addEventListener("click", () => $("chats-file").click());
  $("chats-file").addEventListener(
    "change",
    guarded(async () => {
      const file = $("chats-file").files[0];
      $("chats-file").value = "";
      if (file) await importChats(file);
    }),
  );
}

async function boot() {
  wire();
  checkHealth();
  setInterval(checkHealth, 15000);
  try {
    await start(await api.get("/web/session"));
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) showSignIn();
    else {
      showSignIn(error.message);
    }
  }
}

boot();
