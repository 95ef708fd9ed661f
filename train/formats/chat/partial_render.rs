//! A conversation rendered only as far as its first tokens need.
//!
//! Only `--max-len` tokens of a conversation are kept, so a 100k-turn record need not be
//! rendered turn by turn to the end (the assistant spans alone cost a render of every prefix:
//! quadratic in the turns). The text grows by rendering the messages through the 1st, 2nd, 4th,
//! 8th, ... assistant message, and the whole conversation only when the tokenizer asks for more
//! than the last of those holds, so the work is linear in what the kept tokens need, whatever
//! the conversation's length.
//!
//! A rendering through an assistant message is the start of the whole rendering: that is what
//! prefix stability means, and the span search checks it for every assistant message whose span
//! it computes, refusing the conversation otherwise. So its tokens are the whole rendering's,
//! however much of the conversation follows. (Assistant messages after the kept tokens are no
//! longer checked: a template that breaks there no longer costs the record its kept start.)

use std::borrow::Cow;
use std::ops::Range;

use anyhow::{bail, Result};
use minijinja::value::Value;

use super::{ChatTokenizer, Message, Role};
use crate::formats::token_head::GrowingText;

pub(super) struct PartialRender<'c, 'm> {
    chat: &'c ChatTokenizer,
    /// The conversation, with the default system prompt first when it has none of its own.
    messages: Cow<'m, [Message]>,
    /// Template values of the first `values.len()` messages, made as renders need them.
    values: Vec<Value>,
    /// Indices of the assistant messages.
    assistants: Vec<usize>,
    /// `text` renders the messages through `assistants[through - 1]` (nothing when 0).
    through: usize,
    text: String,
    complete: bool,
    /// Messages handed to the template over every render: the work rendering cost.
    pub rendered_messages: usize,
}

impl<'c, 'm> PartialRender<'c, 'm> {
    /// Nothing rendered yet: the text grows as `reach` asks.
    pub fn new(chat: &'c ChatTokenizer, messages: &'m [Message]) -> Self {
        let messages = chat.with_system(messages);
        let assistants = (0..messages.len())
            .filter(|&i| messages[i].role == Role::Assistant)
            .collect();
        PartialRender {
            chat,
            messages,
            values: Vec::new(),
            assistants,
            through: 0,
            text: String::new(),
            complete: false,
            rendered_messages: 0,
        }
    }

    /// The whole conversation rendered at once.
    pub fn whole(chat: &'c ChatTokenizer, messages: &'m [Message]) -> Result<Self> {
        let mut render = Self::new(chat, messages);
        render.render_all()?;
        Ok(render)
    }

    pub fn into_text(self) -> String {
        self.text
    }

    /// The spans (content + end-of-turn marker) of the assistant messages whose turn starts
    /// before byte `end` of the text; later ones cannot overlap a token that ends by `end`.
    pub fn assistant_spans(&mut self, end: usize) -> Result<Vec<Range<usize>>> {
        let mut spans = Vec::new();
        for at in 0..self.assistants.len() {
            let i = self.assistants[at];
            let before = self.render(i, true)?;
            if before.len() >= end {
                break;
            }
            let through = self.render(i + 1, false)?;
            if !through.starts_with(&before) || !self.text.starts_with(&through) {
                bail!(
                    "chat template is not prefix-stable at message {i}: cannot locate the assistant \
                     turn (does the conversation start with the assistant?)"
                );
            }
            spans.push(self.chat.assistant_span(&through, before.len()));
        }
        Ok(spans)
    }

    /// Renders the first `count` messages.
    fn render(&mut self, count: usize, add_generation_prompt: bool) -> Result<String> {
        while self.values.len() < count {
            self.values
                .push(Value::from_serialize(&self.messages[self.values.len()]));
        }
        self.rendered_messages += count;
        self.chat
            .render_values(&self.values[..count], add_generation_prompt)
    }

    fn render_all(&mut self) -> Result<()> {
        self.text = self.render(self.messages.len(), false)?;
        self.complete = true;
        Ok(())
    }

    /// Renders through twice as many assistant messages, or everything once that is all of them
    /// (messages after the last assistant one belong to the text too).
    fn grow(&mut self) -> Result<()> {
        let through = (2 * self.through).max(1);
        if through >= self.assistants.len() {
            return self.render_all();
        }
        self.text = self.render(self.assistants[through - 1] + 1, false)?;
        self.through = through;
        Ok(())
    }
}

impl GrowingText for PartialRender<'_, '_> {
    fn reach(&mut self, bytes: usize) -> Result<()> {
        while self.text.len() < bytes && !self.complete {
            self.grow()?;
        }
        Ok(())
    }

    fn text(&self) -> &str {
        &self.text
    }

    fn is_complete(&self) -> bool {
        self.complete
    }
}
