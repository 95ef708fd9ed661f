//! Chat rendering and tokenization with an assistant loss mask.
//!
//! Every template, built-in or the model's own, is a Jinja template rendered with minijinja under
//! the settings HF `apply_chat_template` uses (trim_blocks, lstrip_blocks, `raise_exception`,
//! `bos_token`/`eos_token`, `add_generation_prompt`). The built-ins are the official texts:
//! FastChat's vicuna_v1.1 (docs/clover2.md §3.1) written as Jinja, Meta's Llama-3-Instruct template verbatim,
//! and the standard ChatML template.
//!
//! The loss mask comes from character spans, not from hard-coded token offsets (the reference's
//! offsets are heuristic, docs/clover2.md G13): for assistant message i, the text it adds is the rendering of
//! messages[..=i] minus the rendering of messages[..i] with the generation prompt. That span,
//! cut after its end-of-turn marker, is mapped to tokens through the tokenizer's offsets; a token
//! is masked when it overlaps a span, and the first..last overlapping tokens are marked
//! contiguously, which is what HF's `return_assistant_tokens_mask` does.

mod partial_render;

use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use self::partial_render::PartialRender;
use crate::formats::token_head::{encode_head, Head, WholeText};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// Accepts the `{"role"}` names (system/user/assistant) and the ShareGPT `{"from"}` names
    /// (system/human/gpt). Other FastChat aliases (chatgpt, bing, ...) are deliberately rejected
    /// so that a dataset with unexpected speakers is counted instead of silently remapped.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" | "human" => Some(Role::User),
            "assistant" | "gpt" => Some(Role::Assistant),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// A template as a user names it on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TemplateName {
    /// FastChat's vicuna_v1.1.
    Vicuna,
    /// Meta's Llama-3-Instruct template.
    Llama3,
    Chatml,
    /// The model's own `chat_template`.
    #[default]
    Auto,
}

impl TemplateName {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateName::Vicuna => "vicuna",
            TemplateName::Llama3 => "llama3",
            TemplateName::Chatml => "chatml",
            TemplateName::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Template {
    Vicuna,
    Llama3,
    ChatMl,
    /// The model's own `chat_template`.
    Jinja(String),
}

/// FastChat `get_conversation_template("vicuna")` (vicuna_v1.1, SeparatorStyle.ADD_COLON_TWO):
/// `SYS USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>`, generation prompt `ASSISTANT:`,
/// with the BOS the reference tokenizer prepends. A leading system message replaces the default
/// system prompt, as `conv.set_system_message` does.
const VICUNA_TEMPLATE: &str = concat!(
    "{%- if messages and messages[0]['role'] == 'system' -%}",
    "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
    "{%- else -%}",
    "{%- set system = \"A chat between a curious user and an artificial intelligence assistant. ",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\" -%}",
    "{%- set loop_messages = messages -%}",
    "{%- endif -%}",
    "{{- bos_token + system + ' ' -}}",
    "{%- for message in loop_messages -%}",
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}",
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + message['content'] + eos_token -}}",
    "{%- else -%}{{- raise_exception('vicuna: a system message is only allowed first') -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}",
);

/// Meta-Llama-3-8B-Instruct `chat_template`, verbatim (content is trimmed).
const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// The standard ChatML template (as in the HF chat-templating docs; no default system prompt).
const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// End-of-turn markers looked for at the end of an assistant span of a model's own template.
const KNOWN_END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "</s>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
];

impl Template {
    /// `name`: vicuna | llama3 | chatml | auto (None = auto). `auto` needs the model's template.
    pub fn parse(name: Option<&str>, model_template: Option<String>) -> Result<Template> {
        match name.unwrap_or("auto") {
            "vicuna" => Ok(Template::Vicuna),
            "llama3" => Ok(Template::Llama3),
            "chatml" => Ok(Template::ChatMl),
            "auto" => model_template
                .map(Template::Jinja)
                .ok_or_else(|| anyhow!("template auto: the model has no chat_template")),
            other => bail!("unknown template {other:?} (expected vicuna, llama3, chatml or auto)"),
        }
    }

    fn source(&self) -> &str {
        match self {
            Template::Vicuna => VICUNA_TEMPLATE,
            Template::Llama3 => LLAMA3_TEMPLATE,
            Template::ChatMl => CHATML_TEMPLATE,
            Template::Jinja(source) => source,
        }
    }
}

/// Special-token strings of the tokenizer config (`bos_token`, `eos_token`).
#[derive(Debug, Clone, Default)]
struct SpecialTokens {
    bos: Option<String>,
    eos: Option<String>,
}

pub struct ChatTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub template: Template,
    /// Put first when a conversation has no system message of its own: the reference's safety
    /// prompt for LLaMA-3 templates (docs/clover2.md §3.2, §5), none for the others.
    system_prompt: Option<String>,
    env: Environment<'static>,
    /// bos/eos strings handed to the template: the family's own for the built-ins (a Llama-3
    /// template always starts with `<|begin_of_text|>`), the tokenizer config's for Jinja.
    template_tokens: SpecialTokens,
    /// Markers that end an assistant turn in the rendered text.
    end_of_turn: Vec<String>,
    config_tokens: SpecialTokens,
    config_eos_ids: Vec<i64>,
    /// The longest vocabulary entry in bytes: sizes the text that surely holds n tokens.
    max_token_bytes: usize,
}

/// Rendered text plus the byte ranges of the assistant spans (content + end-of-turn marker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub spans: Vec<Range<usize>>,
}

/// A conversation's first tokens and their loss mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationHead {
    pub ids: Vec<i64>,
    pub mask: Vec<u8>,
    /// The whole conversation has more tokens than were asked for.
    pub truncated: bool,
    pub effort: Effort,
}

/// The work that encoding a conversation's head cost, which must not grow with what is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effort {
    /// Messages handed to the template, summed over every render.
    pub rendered_messages: usize,
    /// Bytes handed to the tokenizer, summed over every attempt.
    pub tokenized_bytes: usize,
}

const TEMPLATE_NAME: &str = "chat";

/// The system prompt the reference puts before every LLaMA-3-Instruct conversation, in data
/// generation and in evaluation alike (Llama-2's default safety prompt).
pub const LLAMA3_SYSTEM_PROMPT: &str = "You are a helpful, respectful and honest assistant. \
Always answer as helpfully as possible, while being safe.  Your answers should not include any \
harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your \
responses are socially unbiased and positive in nature.\n\nIf a question does not make any \
sense, or is not factually coherent, explain why instead of answering something not correct. If \
you don't know the answer to a question, please don't share false information.";

impl ChatTokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (bos/eos, `chat_template`, also from
    /// `chat_template.jinja`) and eos ids from `generation_config.json`/`config.json` if present.
    pub fn from_model_dir(dir: &Path, template: Option<&str>) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| anyhow!("loading {}: {e}", tokenizer_path.display()))?;
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let config_tokens = SpecialTokens {
            bos: config
                .as_ref()
                .and_then(|c| token_string(c.get("bos_token"))),
            eos: config
                .as_ref()
                .and_then(|c| token_string(c.get("eos_token"))),
        };
        let model_template = read_model_chat_template(dir, config.as_ref())?;
        let template = Template::parse(template, model_template)
            .with_context(|| format!("model dir {}", dir.display()))?;
        let mut config_eos_ids = Vec::new();
        for name in ["generation_config.json", "config.json"] {
            if let Some(value) = read_json_if_exists(&dir.join(name))? {
                config_eos_ids.extend(ids_of(value.get("eos_token_id")));
            }
        }
        Self::new(tokenizer, template, config_tokens, config_eos_ids)
    }

    fn new(
        tokenizer: tokenizers::Tokenizer,
        template: Template,
        config_tokens: SpecialTokens,
        config_eos_ids: Vec<i64>,
    ) -> Result<Self> {
        let (template_tokens, end_of_turn) = match &template {
            Template::Vicuna => (family_tokens("<s>", "</s>"), vec!["</s>".to_string()]),
            Template::Llama3 => (
                family_tokens("<|begin_of_text|>", "<|end_of_text|>"),
                vec!["<|eot_id|>".to_string()],
            ),
            Template::ChatMl => (
                SpecialTokens {
                    bos: None,
                    eos: Some("<|im_end|>".into()),
                },
                vec!["<|im_end|>".to_string()],
            ),
            Template::Jinja(_) => {
                let mut markers: Vec<String> = config_tokens.eos.iter().cloned().collect();
                for marker in KNOWN_END_OF_TURN {
                    if tokenizer.token_to_id(marker).is_some()
                        && !markers.iter().any(|m| m == marker)
                    {
                        markers.push(marker.to_string());
                    }
                }
                (config_tokens.clone(), markers)
            }
        };
        let env = jinja_environment(template.source())?;
        let max_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1);
        // The LLaMA-3 family: the built-in template, or a model's own that uses its headers.
        let llama3 = match &template {
            Template::Llama3 => true,
            Template::Jinja(source) => source.contains("<|start_header_id|>"),
            _ => false,
        };
        Ok(ChatTokenizer {
            tokenizer,
            system_prompt: llama3.then(|| LLAMA3_SYSTEM_PROMPT.to_string()),
            template,
            env,
            template_tokens,
            end_of_turn,
            config_tokens,
            config_eos_ids,
            max_token_bytes,
        })
    }

    /// `keep` false: render without the default system prompt (conversations keep a system
    /// message of their own), for data that must stay as written.
    pub fn with_system_prompt(mut self, keep: bool) -> Self {
        if !keep {
            self.system_prompt = None;
        }
        self
    }

    /// The default system prompt in use, if any.
    pub fn system_prompt(&self) -> Option<&str> {
        self.system_prompt.as_deref()
    }

    /// `messages`, with the default system prompt first when it has none of its own.
    fn with_system<'m>(&self, messages: &'m [Message]) -> std::borrow::Cow<'m, [Message]> {
        match &self.system_prompt {
            Some(system) if messages.first().is_none_or(|m| m.role != Role::System) => {
                let mut all = vec![Message::new(Role::System, system.clone())];
                all.extend_from_slice(messages);
                std::borrow::Cow::Owned(all)
            }
            _ => std::borrow::Cow::Borrowed(messages),
        }
    }

    /// Renders the whole conversation (no generation prompt) with its assistant spans.
    pub fn render_conversation(&self, messages: &[Message]) -> Result<Rendered> {
        let mut render = PartialRender::whole(self, messages)?;
        let spans = render.assistant_spans(usize::MAX)?;
        Ok(Rendered {
            text: render.into_text(),
            spans,
        })
    }

    /// Renders the conversation followed by the generation prompt.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<String> {
        self.render(messages, true)
    }

    /// Token ids and loss mask (1 = assistant content and its end-of-turn marker).
    pub fn encode_conversation(&self, messages: &[Message]) -> Result<(Vec<i64>, Vec<u8>)> {
        let head = self.encode_conversation_head(messages, usize::MAX)?;
        Ok((head.ids, head.mask))
    }

    /// The first `max_len` tokens of the conversation and their loss mask: the whole encoding
    /// cut to `max_len`, for work bounded by what `max_len` needs however long the conversation
    /// (see `PartialRender` and `token_head`).
    pub fn encode_conversation_head(
        &self,
        messages: &[Message],
        max_len: usize,
    ) -> Result<ConversationHead> {
        let mut render = PartialRender::new(self, messages);
        let head = encode_head(&self.tokenizer, &mut render, max_len, self.max_token_bytes)?;
        let kept_end = head.offsets.iter().map(|&(_, end)| end).max().unwrap_or(0);
        let spans = render.assistant_spans(kept_end)?;
        Ok(ConversationHead {
            mask: mask_from_spans(&head.offsets, &spans),
            ids: head.ids,
            truncated: head.truncated,
            effort: Effort {
                rendered_messages: render.rendered_messages,
                tokenized_bytes: head.tokenized_bytes,
            },
        })
    }

    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<i64>> {
        Ok(self.encode_prompt_head(messages, usize::MAX)?.ids)
    }

    /// The first `limit` tokens of the prompt, without tokenizing all of an enormous one.
    pub fn encode_prompt_head(&self, messages: &[Message], limit: usize) -> Result<Head> {
        let text = self.render_prompt(messages)?;
        encode_head(
            &self.tokenizer,
            &mut WholeText(&text),
            limit,
            self.max_token_bytes,
        )
    }

    /// Decodes without special tokens: the text of a generated answer, stop token excluded.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids = ids
            .iter()
            .map(|&id| u32::try_from(id).map_err(|_| anyhow!("token id {id} out of range")))
            .collect::<Result<Vec<u32>>>()?;
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| anyhow!("decoding tokens: {e}"))
    }

    /// The eos ids (tokenizer config, generation_config.json, config.json) and the template's
    /// end-of-turn tokens, each only where it is a single token of the vocabulary. Sorted, unique.
    pub fn stop_ids(&self) -> Vec<i64> {
        let mut ids = self.config_eos_ids.clone();
        let strings = self.config_tokens.eos.iter().chain(self.end_of_turn.iter());
        ids.extend(strings.filter_map(|s| self.tokenizer.token_to_id(s).map(|id| id as i64)));
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The largest id the tokenizer can produce (added tokens included).
    pub fn max_token_id(&self) -> Option<u32> {
        self.tokenizer.get_vocab(true).into_values().max()
    }

    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages = self.with_system(messages);
        self.render_values(&message_values(&messages), add_generation_prompt)
    }

    /// Renders messages already converted to template values; the span search renders every
    /// prefix of a conversation, and values share their strings instead of copying them.
    fn render_values(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME)?;
        let context = minijinja::context! {
            messages => Value::from(messages.to_vec()),
            bos_token => self.template_tokens.bos.clone().unwrap_or_default(),
            eos_token => self.template_tokens.eos.clone().unwrap_or_default(),
            add_generation_prompt => add_generation_prompt,
        };
        template
            .render(context)
            .map_err(|e| anyhow!("rendering the chat template: {e:#}"))
    }

    /// The assistant span inside `through`, starting at `start`: leading whitespace (the
    /// template's separator, e.g. vicuna's "ASSISTANT: ") dropped, cut after the last end-of-turn
    /// marker so the newline a template writes after the marker is not trained on.
    fn assistant_span(&self, through: &str, start: usize) -> Range<usize> {
        let added = &through[start..];
        let start = start + (added.len() - added.trim_start().len());
        let added = &through[start..];
        let end = self
            .end_of_turn
            .iter()
            .filter_map(|marker| added.rfind(marker.as_str()).map(|at| at + marker.len()))
            .max()
            .unwrap_or_else(|| added.trim_end().len());
        start..start + end
    }
}

fn message_values(messages: &[Message]) -> Vec<Value> {
    messages.iter().map(Value::from_serialize).collect()
}

/// Marks every token from the first to the last one overlapping each span (byte offsets).
pub fn mask_from_spans(offsets: &[(usize, usize)], spans: &[Range<usize>]) -> Vec<u8> {
    let mut mask = vec![0u8; offsets.len()];
    for span in spans {
        let overlaps = |&(start, end): &(usize, usize)| start < span.end && end > span.start;
        let first = offsets.iter().position(overlaps);
        let last = offsets.iter().rposition(overlaps);
        if let (Some(first), Some(last)) = (first, last) {
            mask[first..=last].fill(1);
        }
    }
    mask
}

fn family_tokens(bos: &str, eos: &str) -> SpecialTokens {
    SpecialTokens {
        bos: Some(bos.into()),
        eos: Some(eos.into()),
    }
}

/// A minijinja environment configured like HF's (jinja2 sandbox, trim_blocks, lstrip_blocks)
/// with the helpers chat templates use.
fn jinja_environment(source: &str) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_filter("tojson", |value: Value| -> Result<String, JinjaError> {
        serde_json::to_string(&value)
            .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))
    });
    env.set_unknown_method_callback(python_method);
    env.add_template_owned(TEMPLATE_NAME, source.to_string())
        .map_err(|e| anyhow!("parsing the chat template: {e:#}"))?;
    Ok(env)
}

/// The few Python str/dict methods HF chat templates commonly call.
fn python_method(
    state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, JinjaError> {
    if let Some(text) = value.as_str() {
        let arg = |i: usize| args.get(i).and_then(|v| v.as_str().map(str::to_string));
        let chars: Option<Vec<char>> = arg(0).map(|s| s.chars().collect());
        let strip = |s: &str, left: bool, right: bool| -> String {
            let is_strip = |c: char| match &chars {
                Some(set) => set.contains(&c),
                None => c.is_whitespace(),
            };
            let s = if left {
                s.trim_start_matches(is_strip)
            } else {
                s
            };
            let s = if right {
                s.trim_end_matches(is_strip)
            } else {
                s
            };
            s.to_string()
        };
        return match method {
            "strip" => Ok(Value::from(strip(text, true, true))),
            "lstrip" => Ok(Value::from(strip(text, true, false))),
            "rstrip" => Ok(Value::from(strip(text, false, true))),
            "upper" => Ok(Value::from(text.to_uppercase())),
            "lower" => Ok(Value::from(text.to_lowercase())),
            "startswith" => Ok(Value::from(arg(0).is_some_and(|p| text.starts_with(&p)))),
            "endswith" => Ok(Value::from(arg(0).is_some_and(|p| text.ends_with(&p)))),
            "replace" => match (arg(0), arg(1)) {
                (Some(from), Some(to)) => Ok(Value::from(text.replace(&from, &to))),
                _ => Err(JinjaError::from(ErrorKind::MissingArgument)),
            },
            _ => Err(JinjaError::from(ErrorKind::UnknownMethod)),
        };
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => state.apply_filter("items", &[value.clone()]),
            "get" => {
                let key = args
                    .first()
                    .ok_or(JinjaError::from(ErrorKind::MissingArgument))?;
                let found = value.get_item(key).unwrap_or(Value::UNDEFINED);
                Ok(if found.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    found
                })
            }
            _ => Err(JinjaError::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(JinjaError::from(ErrorKind::UnknownMethod))
}

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(value))
}

/// A special token in tokenizer_config.json is a string or an AddedToken object `{"content"}`.
fn token_string(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` is an integer or a list of integers.
fn ids_of(value: Option<&serde_json::Value>) -> Vec<i64> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_i64()).collect(),
        _ => Vec::new(),
    }
}

/// The model's template: tokenizer_config.json `chat_template` (a string, or a list of named
/// templates of which "default" is taken), else `chat_template.jinja` (newer transformers).
fn read_model_chat_template(
    dir: &Path,
    config: Option<&serde_json::Value>,
) -> Result<Option<String>> {
    match config.and_then(|c| c.get("chat_template")) {
        Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
        Some(serde_json::Value::Array(named)) => {
            let default = named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str());
            return Ok(default.map(str::to_string));
        }
        _ => {}
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let text = std::fs::read_to_string(&jinja)
            .with_context(|| format!("reading {}", jinja.display()))?;
        return Ok(Some(text));
    }
    Ok(None)
}
